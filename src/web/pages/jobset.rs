//! A jobset's page: its evaluations, their counts and diffs.

use super::*;

/// A matrix cell: status label, CSS class, build.
type Cell = (String, &'static str, Option<i64>);

#[derive(Template)]
#[template(path = "jobset.html")]
struct JobsetPage {
    title: String,
    nav: Nav,
    project: String,
    j: jobsets::Jobset,
    evals: Vec<EvalLine>,
    /// Evaluation ids, newest first, the columns of the matrix.
    columns: Vec<i64>,
    matrix: Vec<(String, Vec<Cell>)>,
    /// A pull request that waits for a maintainer's approval.
    awaiting: bool,
}

#[derive(Clone)]
struct EvalLine {
    id: i64,
    status: String,
    when: String,
    commit: String,
    jobs: i64,
    errors: i64,
    new_builds: i64,
    error: Option<String>,
}

#[utoipa::path(get, path = "/jobset/{project}/{jobset}", tag = "pages", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "a jobset with its latest evaluations", content((api::JobsetView = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn jobset(
    State(s): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(api::get_jobset(State(s), Path((project, name))).await?.into_response());
    }
    let key = (project.clone(), name.clone());
    let d = match s.memo.jobsets.get(&key) {
        Some(d) => d,
        None => {
            let d = Arc::new(jobset_data(&s, &project, &name).await?);
            s.memo.jobsets.put(key, d.j.id, d.generation, d.clone());
            d
        }
    };
    html(JobsetPage {
        nav: nav(&s, &headers),
        title: format!("{project}:{name} · Kiln"),
        project,
        j: d.j.clone(),
        evals: d.evals.clone(),
        columns: d.columns.clone(),
        matrix: d.matrix.clone(),
        awaiting: d.j.enabled && !d.j.approved_for(None),
    })
}

/// What the jobset page shows, as read from the database.
pub struct JobsetData {
    j: jobsets::Jobset,
    evals: Vec<EvalLine>,
    columns: Vec<i64>,
    matrix: Vec<(String, Vec<Cell>)>,
    generation: (u64, u64),
}

async fn jobset_data(s: &AppState, project: &str, name: &str) -> Result<JobsetData, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), project, name)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{name}")))?;
    let generation = s.memo.jobsets.generations().of(j.id);
    let evals = evaluations::latest(c.ex(), j.id, 10).await?;
    let columns: Vec<i64> = evals.iter().filter(|e| e.status == "succeeded").map(|e| e.id).take(8).collect();
    let cells = evaluations::cells(c.ex(), &columns).await?;
    let mut by_job: BTreeMap<String, BTreeMap<i64, Cell>> = BTreeMap::new();
    for cell in cells {
        let (label, class) = match (&cell.error, cell.finished) {
            (Some(_), _) => ("evaluation error".to_string(), "bad"),
            (None, Some(f)) => status_of(f, cell.build_status),
            _ => ("–".into(), "other"),
        };
        by_job.entry(cell.job).or_default().insert(cell.eval_id, (label, class, cell.build_id));
    }
    let matrix = by_job
        .into_iter()
        .map(|(job, m)| {
            let row =
                columns.iter().map(|e| m.get(e).cloned().unwrap_or_else(|| (String::new(), "none", None))).collect();
            (job, row)
        })
        .collect();
    let evals = evals
        .into_iter()
        .map(|e| EvalLine {
            id: e.id,
            status: e.status,
            when: when(e.started_at),
            commit: e.commit_sha.chars().take(12).collect(),
            jobs: e.jobs,
            errors: e.error_jobs,
            new_builds: e.new_builds,
            error: e.error,
        })
        .collect();
    Ok(JobsetData { j, evals, columns, matrix, generation })
}
