//! Builds as lists show them: with their project's and jobset's names,
//! newest or most urgent first, found by job, path or status (the home,
//! queue, job and search pages, and Hydra's list routes).

use super::*;

/// A build with the names of its jobset and project, for lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Listed {
    pub id: i64,
    pub project: String,
    pub jobset: String,
    pub job: String,
    pub nix_name: String,
    pub system: String,
    pub finished: bool,
    pub build_status: Option<i64>,
    pub created_at: i64,
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
}

macro_rules! listed_cols {
    () => {
        "b.id, p.name AS project, j.name AS jobset, b.job, b.nix_name, b.system, b.finished, b.build_status, b.created_at, b.start_time, \
         b.stop_time FROM builds b JOIN jobsets j ON j.id = b.jobset_id JOIN projects p ON p.id = j.project_id"
    };
}

/// The most recently finished builds.
pub async fn recent(ex: Ex<'_>, limit: i64) -> Result<Vec<Listed>> {
    let sql =
        concat!("SELECT ", listed_cols!(), " WHERE b.finished = TRUE ORDER BY b.stop_time DESC, b.id DESC LIMIT $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(limit).fetch_all(&mut *c).await?))
}

/// Finished builds, newest first, of a project, jobset, job or system if given.
pub async fn latest_filtered(
    ex: Ex<'_>,
    limit: i64,
    project: Option<&str>,
    jobset: Option<&str>,
    job: Option<&str>,
    system: Option<&str>,
) -> Result<Vec<Listed>> {
    let sql = concat!(
        "SELECT ",
        listed_cols!(),
        " WHERE b.finished = TRUE AND ($2 IS NULL OR p.name = $2) AND ($3 IS NULL OR j.name = $3)
           AND ($4 IS NULL OR b.job = $4) AND ($5 IS NULL OR b.system = $5)
         ORDER BY b.stop_time DESC, b.id DESC LIMIT $1"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(limit).bind(project).bind(jobset).bind(job).bind(system)
        .fetch_all(&mut *c).await?))
}

/// A job's builds, newest first, before `before` (for paging).
pub async fn job_history(ex: Ex<'_>, jobset_id: i64, job: &str, before: i64, limit: i64) -> Result<Vec<Listed>> {
    let sql = concat!(
        "SELECT ",
        listed_cols!(),
        " WHERE b.jobset_id = $1 AND b.job = $2 AND b.id < $3 ORDER BY b.id DESC LIMIT $4"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(job).bind(before).bind(limit).fetch_all(&mut *c).await?))
}

/// Builds of these ids, for the pages that show several.
pub async fn listed(ex: Ex<'_>, ids: &[i64]) -> Result<Vec<Listed>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let b = ex.backend();
    let placeholders = values_placeholders(b, 1, ids.len(), 1);
    match ex {
        Ex::Sqlite(c) => {
            type Row = (i64, String, String, String, String, String, i64, Option<i64>, i64, Option<i64>, Option<i64>);
            let mut rows: Vec<Row> = crate::db::sqlite_json_rows(
                c,
                "json_array(b.id, p.name, j.name, b.job, b.nix_name, b.system, b.finished, b.build_status, \
                 b.created_at, b.start_time, b.stop_time)",
                &format!(
                    "FROM builds b JOIN jobsets j ON j.id = b.jobset_id JOIN projects p ON p.id = j.project_id \
                     WHERE b.id IN {placeholders} ORDER BY b.job"
                ),
                ids,
            )
            .await?;
            rows.sort_by(|a, b| (&a.3, a.0).cmp(&(&b.3, b.0)));
            Ok(rows
                .into_iter()
                .map(
                    |(
                        id,
                        project,
                        jobset,
                        job,
                        nix_name,
                        system,
                        finished,
                        build_status,
                        created_at,
                        start_time,
                        stop_time,
                    )| {
                        Listed {
                            id,
                            project,
                            jobset,
                            job,
                            nix_name,
                            system,
                            finished: finished != 0,
                            build_status,
                            created_at,
                            start_time,
                            stop_time,
                        }
                    },
                )
                .collect())
        }
        Ex::Postgres(c) => {
            let sql =
                sqlx::AssertSqlSafe(format!("SELECT {} WHERE b.id IN {placeholders} ORDER BY b.job", listed_cols!()));
            let mut q = sqlx::query_as(sql);
            for id in ids {
                q = q.bind(*id);
            }
            Ok(q.fetch_all(&mut *c).await?)
        }
    }
}

/// Unfinished builds, oldest first, for the queue page.
pub async fn queued(ex: Ex<'_>, limit: i64) -> Result<Vec<Listed>> {
    let sql =
        concat!("SELECT ", listed_cols!(), " WHERE b.finished = FALSE ORDER BY b.global_priority DESC, b.id LIMIT $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(limit).fetch_all(&mut *c).await?))
}

pub async fn count_unfinished(ex: Ex<'_>) -> Result<i64> {
    Ok(
        run!(ex, c => sqlx::query_scalar("SELECT COUNT(*) FROM builds WHERE finished = FALSE").fetch_one(&mut *c).await?),
    )
}

/// Builds whose job name, derivation or output path contains `needle`.
pub async fn search(ex: Ex<'_>, needle: &str, limit: i64) -> Result<Vec<Listed>> {
    let pattern = like_pattern(needle);
    let sql = concat!(
        "SELECT ",
        listed_cols!(),
        " WHERE b.job LIKE $1 ESCAPE '\\' OR b.drv_path LIKE $1 ESCAPE '\\'
             OR b.id IN (SELECT build_id FROM build_outputs WHERE path LIKE $1 ESCAPE '\\')
         ORDER BY b.id DESC LIMIT $2"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(pattern).bind(limit).fetch_all(&mut *c).await?))
}

/// Builds whose derivation path contains `needle` (Hydra's `buildsdrv`).
pub async fn search_drv(ex: Ex<'_>, needle: &str, limit: i64) -> Result<Vec<Listed>> {
    let sql = concat!("SELECT ", listed_cols!(), " WHERE b.drv_path LIKE $1 ESCAPE '\\' ORDER BY b.id DESC LIMIT $2");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(like_pattern(needle)).bind(limit).fetch_all(&mut *c).await?))
}

fn like_pattern(needle: &str) -> String {
    format!("%{}%", needle.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"))
}
