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
    /// The evaluation this one is compared with.
    pub prev_eval_id: Option<i64>,
    pub jobs_new: i64,
    pub jobs_removed: i64,
    pub jobs_changed: i64,
    pub errors_new: i64,
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
    pub diff: Diff,
}

/// How an evaluation differs from the previous one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Diff {
    pub prev_eval_id: Option<i64>,
    /// Jobs that were not in the previous evaluation.
    pub new: Vec<String>,
    /// Jobs of the previous evaluation that are gone.
    pub removed: Vec<String>,
    /// Jobs whose derivation changed.
    pub changed: Vec<String>,
    /// Jobs that fail to evaluate now and did not before.
    pub new_errors: Vec<String>,
}

macro_rules! cols {
    () => {
        "id, jobset_id, status, commit_sha, git_ref, flake_ref, lock_hash, config_hash, started_at, finished_at, \
         duration_ms, workers, jobs, error_jobs, new_builds, forced, error, stderr, prev_eval_id, jobs_new, \
         jobs_removed, jobs_changed, errors_new"
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
pub async fn finish(mut ex: Ex<'_>, id: i64, duration_ms: i64, o: &Outcome<'_>) -> Result<()> {
    let status = if o.error.is_some() { "failed" } else { "succeeded" };
    run!(ex.re(), c => sqlx::query(
        "UPDATE evaluations SET status = $2, finished_at = $3, duration_ms = $4, lock_hash = $5, jobs = $6,
             error_jobs = $7, new_builds = $8, error = $9, stderr = $10, prev_eval_id = $11, jobs_new = $12,
             jobs_removed = $13, jobs_changed = $14, errors_new = $15 WHERE id = $1")
        .bind(id).bind(status).bind(now()).bind(duration_ms).bind(o.lock_hash).bind(o.jobs)
        .bind(o.error_jobs).bind(o.new_builds).bind(o.error).bind(o.stderr).bind(o.diff.prev_eval_id)
        .bind(o.diff.new.len() as i64).bind(o.diff.removed.len() as i64).bind(o.diff.changed.len() as i64)
        .bind(o.diff.new_errors.len() as i64)
        .execute(&mut *c).await?.rows_affected());
    super::histograms::observe(ex, super::histograms::EVALUATION_DURATION, duration_ms as f64 / 1000.0).await?;
    Ok(())
}

/// The jobsets that evaluated a commit (a check suite's Re-run).
pub async fn jobsets_of_commit(ex: Ex<'_>, sha: &str) -> Result<Vec<i64>> {
    Ok(
        run!(ex, c => sqlx::query_scalar("SELECT DISTINCT jobset_id FROM evaluations WHERE commit_sha = $1 ORDER BY jobset_id")
        .bind(sha).fetch_all(&mut *c).await?),
    )
}

pub async fn get(ex: Ex<'_>, id: i64) -> Result<Option<Evaluation>> {
    let sql = concat!("SELECT ", cols!(), " FROM evaluations WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

/// The newest evaluations of a jobset, newest first.
pub async fn latest(ex: Ex<'_>, jobset_id: i64, limit: i64) -> Result<Vec<Evaluation>> {
    let sql = concat!("SELECT ", cols!(), " FROM evaluations WHERE jobset_id = $1 ORDER BY id DESC LIMIT $2");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(limit).fetch_all(&mut *c).await?))
}

/// One page of a jobset's evaluations, newest first, and how many it has.
pub async fn page(mut ex: Ex<'_>, jobset_id: i64, offset: i64, limit: i64) -> Result<(Vec<Evaluation>, i64)> {
    let sql = concat!("SELECT ", cols!(), " FROM evaluations WHERE jobset_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3");
    let list =
        run!(ex.re(), c => sqlx::query_as(sql).bind(jobset_id).bind(limit).bind(offset).fetch_all(&mut *c).await?);
    let total = run!(ex, c => sqlx::query_scalar("SELECT COUNT(*) FROM evaluations WHERE jobset_id = $1")
        .bind(jobset_id).fetch_one(&mut *c).await?);
    Ok((list, total))
}

/// The build of each member of these evaluations: (evaluation, build), by build id.
pub async fn build_ids(ex: Ex<'_>, eval_ids: &[i64]) -> Result<Vec<(i64, i64)>> {
    if eval_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT eval_id, build_id FROM eval_members WHERE build_id IS NOT NULL AND eval_id IN {} ORDER BY build_id",
        super::builds::values_placeholders(ex.backend(), 1, eval_ids.len(), 1)
    ));
    Ok(run!(ex, c => {
        let mut q = sqlx::query_as(sql);
        for id in eval_ids {
            q = q.bind(*id);
        }
        q.fetch_all(&mut *c).await?
    }))
}

/// The members of an evaluation named `jobs` (a deployment's hosts and
/// required jobs): `(job, build, error)` for each that exists.
pub async fn members_named(mut ex: Ex<'_>, eval_id: i64, jobs: &[String]) -> Result<Vec<Member>> {
    let mut out = Vec::new();
    for job in jobs {
        let row: Option<(String, Option<i64>, bool, Option<String>)> = run!(ex.re(), c => sqlx::query_as(
            "SELECT job, build_id, is_new, error FROM eval_members WHERE eval_id = $1 AND job = $2")
            .bind(eval_id).bind(job).fetch_optional(&mut *c).await?);
        if let Some((job, build_id, is_new, error)) = row {
            out.push(Member { eval_id, job, build_id, is_new, error });
        }
    }
    Ok(out)
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
    match ex {
        Ex::Sqlite(c) => {
            type Row = (i64, String, Option<i64>, i64, Option<String>);
            let mut rows: Vec<Row> = super::sqlite_json_rows(
                c,
                "json_array(eval_id, job, build_id, is_new, error)",
                "FROM eval_members WHERE eval_id = ? ORDER BY job",
                &[eval_id],
            )
            .await?;
            rows.sort_by(|a, b| a.1.cmp(&b.1));
            Ok(rows
                .into_iter()
                .map(|(eval_id, job, build_id, is_new, error)| Member {
                    eval_id,
                    job,
                    build_id,
                    is_new: is_new != 0,
                    error,
                })
                .collect())
        }
        Ex::Postgres(c) => Ok(sqlx::query_as(
            "SELECT eval_id, job, build_id, is_new, error FROM eval_members WHERE eval_id = $1 ORDER BY job",
        )
        .bind(eval_id)
        .fetch_all(&mut *c)
        .await?),
    }
}

/// Progress of a running evaluation: jobs found so far.
pub async fn set_progress(ex: Ex<'_>, id: i64, jobs: i64, error_jobs: i64, new_builds: i64) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE evaluations SET jobs = $2, error_jobs = $3, new_builds = $4 WHERE id = $1 AND status = 'running'")
        .bind(id).bind(jobs).bind(error_jobs).bind(new_builds).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// The newest succeeded evaluation of the jobset before `before_id`.
pub async fn previous_succeeded(ex: Ex<'_>, jobset_id: i64, before_id: i64) -> Result<Option<Evaluation>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM evaluations WHERE jobset_id = $1 AND id < $2 AND status = 'succeeded' ORDER BY id DESC LIMIT 1"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(before_id).fetch_optional(&mut *c).await?))
}

/// A member as the diff sees it: job, derivation (none for errors), error.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MemberState {
    pub job: String,
    pub drv_path: Option<String>,
    pub error: Option<String>,
}

pub async fn member_states(ex: Ex<'_>, eval_id: i64) -> Result<Vec<MemberState>> {
    match ex {
        Ex::Sqlite(c) => {
            let mut rows: Vec<(String, Option<String>, Option<String>)> = super::sqlite_json_rows(
                c,
                "json_array(m.job, b.drv_path, m.error)",
                "FROM eval_members m LEFT JOIN builds b ON b.id = m.build_id WHERE m.eval_id = ? ORDER BY m.job",
                &[eval_id],
            )
            .await?;
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(rows.into_iter().map(|(job, drv_path, error)| MemberState { job, drv_path, error }).collect())
        }
        Ex::Postgres(c) => Ok(sqlx::query_as(
            "SELECT m.job, b.drv_path, m.error FROM eval_members m LEFT JOIN builds b ON b.id = m.build_id
             WHERE m.eval_id = $1 ORDER BY m.job",
        )
        .bind(eval_id)
        .fetch_all(&mut *c)
        .await?),
    }
}

/// Compares two member lists.
pub fn diff(prev_eval_id: Option<i64>, prev: &[MemberState], cur: &[MemberState]) -> Diff {
    use std::collections::HashMap;
    let p: HashMap<&str, &MemberState> = prev.iter().map(|m| (m.job.as_str(), m)).collect();
    let c: HashMap<&str, &MemberState> = cur.iter().map(|m| (m.job.as_str(), m)).collect();
    let mut d = Diff { prev_eval_id, ..Default::default() };
    for m in cur {
        match p.get(m.job.as_str()) {
            None => d.new.push(m.job.clone()),
            Some(old) => {
                if m.error.is_none() && old.error.is_none() && m.drv_path != old.drv_path {
                    d.changed.push(m.job.clone());
                }
                if m.error.is_some() && old.error.is_none() {
                    d.new_errors.push(m.job.clone());
                }
            }
        }
        if m.error.is_some() && !p.contains_key(m.job.as_str()) {
            d.new_errors.push(m.job.clone());
        }
    }
    for m in prev {
        if !c.contains_key(m.job.as_str()) {
            d.removed.push(m.job.clone());
        }
    }
    d
}

/// Deletes finished evaluations of the jobset beyond the newest `keep`
/// (their members go with them; builds stay as the job's history).
pub async fn prune(mut ex: Ex<'_>, jobset_id: i64, keep: i64) -> Result<u64> {
    let ids: Vec<i64> = run!(ex.re(), c => sqlx::query_scalar(
        "SELECT id FROM evaluations WHERE jobset_id = $1 AND status <> 'running' ORDER BY id DESC")
        .bind(jobset_id).fetch_all(&mut *c).await?);
    let mut n = 0;
    for id in ids.into_iter().skip(keep.max(0) as usize) {
        n += run!(ex.re(), c => sqlx::query("DELETE FROM evaluations WHERE id = $1").bind(id).execute(&mut *c).await?.rows_affected());
    }
    Ok(n)
}

/// The evaluation running for a jobset, if any.
pub async fn running(ex: Ex<'_>, jobset_id: i64) -> Result<Option<Evaluation>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM evaluations WHERE jobset_id = $1 AND status = 'running' ORDER BY id DESC LIMIT 1"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).fetch_optional(&mut *c).await?))
}

/// Marks evaluations left running by a previous process as failed.
pub async fn fail_interrupted(ex: Ex<'_>) -> Result<u64> {
    Ok(run!(ex, c => sqlx::query(
        "UPDATE evaluations SET status = 'failed', finished_at = $1, error = 'interrupted: Kiln stopped during the evaluation'
         WHERE status = 'running'")
        .bind(now()).execute(&mut *c).await?.rows_affected()))
}

/// Adds many members with multi-row statements.
pub async fn add_members(mut ex: Ex<'_>, members: &[Member]) -> Result<()> {
    if let Ex::Postgres(c) = &mut ex {
        // Column arrays: one statement of five parameters (see
        // `builds::create_many`).
        sqlx::query(
            "INSERT INTO eval_members (eval_id, job, build_id, is_new, error)
             SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::BOOLEAN[], $5::TEXT[])
             ON CONFLICT (eval_id, job) DO UPDATE SET build_id = excluded.build_id, is_new = excluded.is_new,
                 error = excluded.error",
        )
        .bind(members.iter().map(|m| m.eval_id).collect::<Vec<_>>())
        .bind(members.iter().map(|m| m.job.as_str()).collect::<Vec<_>>())
        .bind(members.iter().map(|m| m.build_id).collect::<Vec<_>>())
        .bind(members.iter().map(|m| m.is_new).collect::<Vec<_>>())
        .bind(members.iter().map(|m| m.error.as_deref()).collect::<Vec<_>>())
        .execute(&mut **c)
        .await?;
        return Ok(());
    }
    for chunk in members.chunks(200) {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO eval_members (eval_id, job, build_id, is_new, error) VALUES {}
             ON CONFLICT (eval_id, job) DO UPDATE SET build_id = excluded.build_id, is_new = excluded.is_new,
                 error = excluded.error",
            super::builds::values_placeholders(ex.backend(), chunk.len(), 5, 1)
        ));
        run!(ex.re(), c => {
            let mut q = sqlx::query(sql);
            for m in chunk {
                q = q.bind(m.eval_id).bind(&m.job).bind(m.build_id).bind(m.is_new).bind(&m.error);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(())
}

/// The evaluations a build belongs to.
pub async fn of_build(ex: Ex<'_>, build_id: i64) -> Result<Vec<i64>> {
    Ok(run!(ex, c => sqlx::query_scalar("SELECT eval_id FROM eval_members WHERE build_id = $1 ORDER BY eval_id")
        .bind(build_id).fetch_all(&mut *c).await?))
}

/// A job's state in one evaluation: its build's status, or its error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Cell {
    pub eval_id: i64,
    pub job: String,
    pub build_id: Option<i64>,
    pub finished: Option<bool>,
    pub build_status: Option<i64>,
    pub error: Option<String>,
    /// How long the build took, once it ran.
    pub secs: Option<i64>,
}

/// The job × evaluation matrix of the given evaluations.
pub async fn cells(ex: Ex<'_>, eval_ids: &[i64]) -> Result<Vec<Cell>> {
    if eval_ids.is_empty() {
        return Ok(Vec::new());
    }
    let b = ex.backend();
    let from = format!(
        "FROM eval_members m LEFT JOIN builds b ON b.id = m.build_id WHERE m.eval_id IN {} ORDER BY m.job, m.eval_id",
        super::builds::values_placeholders(b, 1, eval_ids.len(), 1)
    );
    match ex {
        Ex::Sqlite(c) => {
            type Row = (i64, String, Option<i64>, Option<i64>, Option<i64>, Option<String>, Option<i64>);
            let rows: Vec<Row> = super::sqlite_json_rows(
                c,
                "json_array(m.eval_id, m.job, m.build_id, b.finished, b.build_status, m.error, b.stop_time - b.start_time)",
                &from,
                eval_ids,
            )
            .await?;
            // An aggregate need not keep its subquery's order.
            let mut rows = rows;
            rows.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
            Ok(rows
                .into_iter()
                .map(|(eval_id, job, build_id, finished, build_status, error, secs)| Cell {
                    eval_id,
                    job,
                    build_id,
                    finished: finished.map(|f| f != 0),
                    build_status,
                    error,
                    secs,
                })
                .collect())
        }
        Ex::Postgres(c) => {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT m.eval_id, m.job, m.build_id, b.finished, b.build_status, m.error,
                     b.stop_time - b.start_time AS secs {from}"
            ));
            let mut q = sqlx::query_as(sql);
            for id in eval_ids {
                q = q.bind(*id);
            }
            Ok(q.fetch_all(&mut *c).await?)
        }
    }
}

/// Takes the write lock on these evaluations until the transaction ends (a
/// row lock on PostgreSQL, the database's write lock on SQLite), so
/// transactions that report on one evaluation run one after another. Pass
/// the ids sorted, so two transactions never wait on each other in a circle.
pub async fn lock(mut ex: Ex<'_>, ids: &[i64]) -> Result<()> {
    for id in ids {
        run!(ex.re(), c => sqlx::query("UPDATE evaluations SET status = status WHERE id = $1")
            .bind(*id).execute(&mut *c).await?.rows_affected());
    }
    Ok(())
}
