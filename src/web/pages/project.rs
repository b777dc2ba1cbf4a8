//! A project's page: its jobsets and their last evaluations.

use super::*;

#[derive(Template)]
#[template(path = "project.html")]
struct ProjectPage {
    title: String,
    nav: Nav,
    p: projects::Project,
    jobsets: Vec<JobsetLine>,
}

struct JobsetLine {
    name: String,
    branch: String,
    enabled: bool,
    last_eval: String,
    counts: String,
    error: Option<String>,
}

#[utoipa::path(get, path = "/project/{project}", tag = "pages", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "a project and its jobsets", content((api::ProjectView = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn project(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(api::get_project(State(s), Path(name)).await?.into_response());
    }
    let mut c = s.db.conn().await?;
    let p = projects::get(c.ex(), &name).await?.ok_or_else(|| WebError::NotFound(format!("project {name}")))?;
    let mut lines = Vec::new();
    for j in jobsets::list_for_project(c.ex(), p.id).await? {
        let latest = evaluations::latest(c.ex(), j.id, 1).await?.into_iter().next();
        let counts = match &latest {
            Some(e) => summary(&evaluations::cells(c.ex(), &[e.id]).await?),
            None => String::new(),
        };
        lines.push(JobsetLine {
            branch: j.branch.clone().unwrap_or_else(|| {
                if j.pull_requests {
                    "pull requests".into()
                } else if j.merge_queue {
                    "merge groups".into()
                } else {
                    "default branch".into()
                }
            }),
            enabled: j.enabled,
            last_eval: latest.map(|e| when(e.started_at)).unwrap_or_else(|| "never".into()),
            counts,
            error: j.error,
            name: j.name,
        });
    }
    html(ProjectPage { nav: nav(&s, &headers), title: format!("{} · Kiln", p.name), p, jobsets: lines })
}

fn summary(cells: &[evaluations::Cell]) -> String {
    let (mut ok, mut bad, mut queued, mut errors) = (0, 0, 0, 0);
    for c in cells {
        match (c.error.is_some(), c.finished, c.build_status) {
            (true, _, _) => errors += 1,
            (_, Some(true), Some(0)) => ok += 1,
            (_, Some(true), _) => bad += 1,
            _ => queued += 1,
        }
    }
    format!("{ok} succeeded, {bad} failed, {queued} queued, {errors} evaluation errors")
}
