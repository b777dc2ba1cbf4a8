//! The `deployment_hosts` table: each host's part in a deployment, the
//! closure it goes to and the one it had, its status (`pending`, `waiting`
//! (a pull host, for its agent), `switching`, `checking`, `rolling-back`
//! (a pull host a later wave's failure sends back), then `succeeded`, `skipped`, `failed`,
//! `rolled-back`, `rollback-failed` or `not-started`), the activation's
//! log and each health check's output. The previous closure is written
//! before the host is touched, so a rollback after a crash knows it.

use serde::Serialize;

use super::{Ex, Result, now, run};

pub const PENDING: &str = "pending";
/// A pull host's wave has come: its agent may take the closure.
pub const WAITING: &str = "waiting";
pub const SWITCHING: &str = "switching";
pub const CHECKING: &str = "checking";
/// A pull host that succeeded, asked to go back to its previous closure
/// because a later wave failed (`on_failure = "rollback-all"`).
pub const ROLLING_BACK: &str = "rolling-back";
pub const SUCCEEDED: &str = "succeeded";
pub const SKIPPED: &str = "skipped";
pub const FAILED: &str = "failed";
pub const ROLLED_BACK: &str = "rolled-back";
pub const ROLLBACK_FAILED: &str = "rollback-failed";
pub const NOT_STARTED: &str = "not-started";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct HostRow {
    pub deployment_id: i64,
    pub host: String,
    pub wave: i64,
    pub job: String,
    pub build_id: Option<i64>,
    pub store_path: String,
    pub previous_path: Option<String>,
    pub status: String,
    /// The host-side directory of this switch (its watchdog's files).
    pub work_dir: Option<String>,
    pub log: String,
    /// JSON: `[{"command", "ok", "output"}]`.
    pub checks: String,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl HostRow {
    pub fn is_done(&self) -> bool {
        !matches!(self.status.as_str(), PENDING | WAITING | SWITCHING | CHECKING | ROLLING_BACK)
    }
}

macro_rules! cols {
    () => {
        "deployment_id, host, wave, job, build_id, store_path, previous_path, status, work_dir, log, checks, error, \
         started_at, finished_at"
    };
}

/// A host's planned part: `(host, wave, job, build, closure)`.
pub struct Planned<'a> {
    pub host: &'a str,
    pub wave: i64,
    pub job: &'a str,
    pub build_id: Option<i64>,
    pub store_path: &'a str,
}

pub async fn add(mut ex: Ex<'_>, deployment_id: i64, hosts: &[Planned<'_>]) -> Result<()> {
    for h in hosts {
        run!(ex.re(), c => sqlx::query(
            "INSERT INTO deployment_hosts (deployment_id, host, wave, job, build_id, store_path, status)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending')")
            .bind(deployment_id).bind(h.host).bind(h.wave).bind(h.job).bind(h.build_id).bind(h.store_path)
            .execute(&mut *c).await?.rows_affected());
    }
    Ok(())
}

pub async fn of_deployment(ex: Ex<'_>, deployment_id: i64) -> Result<Vec<HostRow>> {
    let sql = concat!("SELECT ", cols!(), " FROM deployment_hosts WHERE deployment_id = $1 ORDER BY wave, host");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(deployment_id).fetch_all(&mut *c).await?))
}

/// Records what the host had, and where this attempt's switch keeps its
/// files, before anything on it changes. A previous path already recorded
/// stays: after a crash the host may already be on the new closure.
/// `None` when the part has ended (a pull host's agent came too late).
pub async fn begin_switch(
    ex: Ex<'_>,
    deployment_id: i64,
    host: &str,
    previous: Option<&str>,
    work_dir: &str,
) -> Result<Option<HostRow>> {
    let sql = concat!(
        "UPDATE deployment_hosts SET status = 'switching', previous_path = COALESCE(previous_path, $3),
             work_dir = $4, started_at = COALESCE(started_at, $5)
         WHERE deployment_id = $1 AND host = $2 AND status IN ('pending', 'waiting', 'switching', 'checking')
         RETURNING ",
        cols!()
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(deployment_id).bind(host).bind(previous).bind(work_dir).bind(now())
        .fetch_optional(&mut *c).await?))
}

pub async fn set_status(ex: Ex<'_>, deployment_id: i64, host: &str, status: &str, error: Option<&str>) -> Result<()> {
    let done = !matches!(status, PENDING | WAITING | SWITCHING | CHECKING | ROLLING_BACK);
    run!(ex, c => sqlx::query(
        "UPDATE deployment_hosts SET status = $3, error = COALESCE($4, error),
             finished_at = CASE WHEN $5 THEN $6 ELSE NULL END WHERE deployment_id = $1 AND host = $2")
        .bind(deployment_id).bind(host).bind(status).bind(error).bind(done).bind(now())
        .execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Moves a host from `from` to `to` unless something else moved it first
/// (an agent's report racing the server's timeout); says whether it did.
pub async fn set_status_if(
    ex: Ex<'_>,
    deployment_id: i64,
    host: &str,
    from: &[&str],
    to: &str,
    error: Option<&str>,
) -> Result<bool> {
    let done = !matches!(to, PENDING | WAITING | SWITCHING | CHECKING | ROLLING_BACK);
    let n = run!(ex, c => sqlx::query(
        "UPDATE deployment_hosts SET status = $3, error = COALESCE($4, error),
             finished_at = CASE WHEN $5 THEN $6 ELSE NULL END
         WHERE deployment_id = $1 AND host = $2 AND status IN ($7, $8, $9, $10)")
        .bind(deployment_id).bind(host).bind(to).bind(error).bind(done).bind(now())
        .bind(from.first().copied().unwrap_or("")).bind(from.get(1).copied().unwrap_or(""))
        .bind(from.get(2).copied().unwrap_or("")).bind(from.get(3).copied().unwrap_or(""))
        .execute(&mut *c).await?.rows_affected());
    Ok(n > 0)
}

pub async fn get(ex: Ex<'_>, deployment_id: i64, host: &str) -> Result<Option<HostRow>> {
    let sql = concat!("SELECT ", cols!(), " FROM deployment_hosts WHERE deployment_id = $1 AND host = $2");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(deployment_id).bind(host).fetch_optional(&mut *c).await?))
}

/// Parts named `host` that an agent may take or resume: waiting, left
/// mid-switch, or to be rolled back, in a running deployment; with their
/// environment's id.
pub async fn for_agent(mut ex: Ex<'_>, host: &str) -> Result<Vec<(i64, HostRow)>> {
    let ids: Vec<(i64, i64)> = run!(ex.re(), c => sqlx::query_as(
        "SELECT d.environment_id, h.deployment_id
         FROM deployment_hosts h JOIN deployments d ON d.id = h.deployment_id
         WHERE h.host = $1 AND d.status = 'running' AND h.status IN ('waiting', 'switching', 'checking', 'rolling-back')
         ORDER BY h.deployment_id")
        .bind(host).fetch_all(&mut *c).await?);
    let mut out = Vec::new();
    for (env, dep) in ids {
        if let Some(r) = get(ex.re(), dep, host).await? {
            out.push((env, r));
        }
    }
    Ok(out)
}

pub async fn append_log(ex: Ex<'_>, deployment_id: i64, host: &str, text: &str) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE deployment_hosts SET log = log || $3 WHERE deployment_id = $1 AND host = $2")
        .bind(deployment_id).bind(host).bind(text).execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn set_checks(ex: Ex<'_>, deployment_id: i64, host: &str, checks_json: &str) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE deployment_hosts SET checks = $3 WHERE deployment_id = $1 AND host = $2")
        .bind(deployment_id).bind(host).bind(checks_json).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// What each host of the environment runs now, as far as Kiln made it so:
/// per host, the closure its newest finished part left it on.
pub async fn current(ex: Ex<'_>, environment_id: i64) -> Result<Vec<(String, Option<String>, i64)>> {
    let sql = "SELECT h.host, h.status, h.store_path, h.previous_path, h.deployment_id
               FROM deployment_hosts h JOIN deployments d ON d.id = h.deployment_id
               WHERE d.environment_id = $1 AND h.status IN ('succeeded', 'skipped', 'rolled-back', 'failed', 'rollback-failed')
               ORDER BY h.deployment_id DESC";
    let rows: Vec<(String, String, String, Option<String>, i64)> =
        run!(ex, c => sqlx::query_as(sql).bind(environment_id).fetch_all(&mut *c).await?);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (host, status, path, prev, dep) in rows {
        if !seen.insert(host.clone()) {
            continue;
        }
        let on = match status.as_str() {
            SUCCEEDED | SKIPPED => Some(path),
            ROLLED_BACK => prev,
            // Where a failed switch left it is not known for certain.
            _ => None,
        };
        out.push((host, on, dep));
    }
    Ok(out)
}

/// The closures the cache must keep for deployments: each host's newest
/// part that began (what it runs, and the previous closure a rollback
/// goes to), and every part of an open deployment (what hosts are about to
/// substitute).
pub async fn retained_paths(ex: Ex<'_>) -> Result<Vec<String>> {
    let rows: Vec<(String, Option<String>)> = run!(ex, c => sqlx::query_as(
        "SELECT h.store_path, h.previous_path FROM deployment_hosts h JOIN deployments d ON d.id = h.deployment_id
         WHERE d.status IN ('waiting', 'queued', 'running')
            OR h.deployment_id = (
                SELECT MAX(h2.deployment_id) FROM deployment_hosts h2 JOIN deployments d2 ON d2.id = h2.deployment_id
                WHERE h2.host = h.host AND d2.environment_id = d.environment_id
                  AND h2.status NOT IN ('pending', 'waiting', 'not-started'))")
        .fetch_all(&mut *c).await?);
    let mut out = Vec::new();
    for (path, previous) in rows {
        out.push(path);
        out.extend(previous);
    }
    Ok(out)
}

/// Hosts' parts by status, for `/metrics`.
pub async fn count_by_status(ex: Ex<'_>) -> Result<Vec<(String, i64)>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT status, COUNT(*) FROM deployment_hosts GROUP BY status ORDER BY status")
        .fetch_all(&mut *c).await?))
}
