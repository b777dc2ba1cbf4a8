//! The JSON routes for projects, jobsets and evaluations, with Hydra's
//! field names where Hydra has the same object (so its clients and scripts
//! keep working), and the write routes that create projects and trigger
//! evaluations.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{AppState, ErrorBody, WebError, auth};
use crate::config::valid_name;
use crate::db::evaluations::{self, Evaluation};
use crate::db::jobsets::{self, Jobset};
use crate::db::projects::{self, Project, ProjectSpec};

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProjectView {
    name: String,
    displayname: String,
    description: String,
    /// 1 or 0, as Hydra answers.
    enabled: i64,
    hidden: i64,
    repo: String,
    github: Option<String>,
    declared_in: String,
    jobsets: Vec<String>,
    error: Option<String>,
    lastsynced: Option<i64>,
}

pub(super) fn project_view(p: Project, jobsets: Vec<String>) -> ProjectView {
    ProjectView {
        name: p.name,
        displayname: p.display_name,
        description: p.description,
        enabled: p.enabled as i64,
        hidden: p.hidden as i64,
        repo: p.repo,
        github: p.github_repo,
        declared_in: p.declared_in,
        jobsets,
        error: p.error,
        lastsynced: p.last_synced_at,
    }
}

/// Every project that is not hidden, as Hydra lists them on `/`.
pub async fn list_projects(s: &AppState) -> Result<Vec<ProjectView>, WebError> {
    let mut c = s.db.conn().await?;
    let mut names: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (project, name, _) in jobsets::names(c.ex()).await? {
        names.entry(project).or_default().push(name);
    }
    let list = projects::list(c.ex()).await?;
    Ok(list
        .into_iter()
        .filter(|p| !p.hidden)
        .map(|p| {
            let js = names.remove(&p.id).unwrap_or_default();
            project_view(p, js)
        })
        .collect())
}

pub async fn get_project(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<ProjectView>, WebError> {
    let mut c = s.db.conn().await?;
    let p = projects::get(c.ex(), &name).await?.ok_or_else(|| WebError::NotFound(format!("project {name}")))?;
    let js = jobsets::list_for_project(c.ex(), p.id).await?.into_iter().map(|j| j.name).collect();
    Ok(Json(project_view(p, js)))
}

/// Hydra's project body, plus the repository.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectBody {
    #[serde(default)]
    displayname: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    hidden: Option<bool>,
    /// A git URL or path.
    #[schema(min_length = 1, pattern = "^[^-\\s]")]
    repo: String,
    #[serde(default)]
    github: Option<String>,
    /// Hydra sends these; Kiln has no use for them.
    #[serde(default)]
    #[allow(dead_code)]
    owner: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    homepage: Option<String>,
}

#[utoipa::path(put, path = "/project/{project}", tag = "projects", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")), security(("token" = [])),
    request_body = ProjectBody,
    responses((status = 200, description = "updated", body = ProjectView), (status = 201, description = "created", body = ProjectView),
        (status = 400, description = "a bad name or body", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody)))]
pub async fn put_project(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ProjectBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, WebError> {
    auth::require(&s, &headers).await?;
    let Json(b) = body.map_err(|e| WebError::BadRequest(e.body_text()))?;
    if !valid_name(&name) {
        return Err(WebError::BadRequest(format!(
            "{name:?} is not a valid project name (letters, digits, '-', '_', '.')"
        )));
    }
    // Leading '-' would be read by git as an option.
    if b.repo.trim().is_empty() || b.repo.starts_with(|c: char| c == '-' || c.is_whitespace()) {
        return Err(WebError::BadRequest("repo must name a git repository".into()));
    }
    let mut c = s.db.conn().await?;
    let existed = projects::get(c.ex(), &name).await?;
    let p = projects::upsert(
        c.ex(),
        &ProjectSpec {
            name: name.clone(),
            display_name: b.displayname.unwrap_or_default(),
            description: b.description.unwrap_or_default(),
            repo: b.repo.trim().to_string(),
            github_repo: b.github,
            enabled: b.enabled.unwrap_or(true),
            hidden: b.hidden.unwrap_or(false),
            declared_in: "api".into(),
        },
    )
    .await?;
    let js = jobsets::list_for_project(c.ex(), p.id).await?.into_iter().map(|j| j.name).collect();
    s.evaluator.wake();
    s.memo.forget();
    let code = if existed.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(project_view(p, js))).into_response())
}

#[utoipa::path(delete, path = "/project/{project}", tag = "projects", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")), security(("token" = [])),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 204, description = "deleted with its jobsets, evaluations and builds"), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn delete_project(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    auth::require(&s, &headers).await?;
    let mut c = s.db.conn().await?;
    if !projects::delete(c.ex(), &name).await? {
        return Err(WebError::NotFound(format!("project {name}")));
    }
    s.memo.forget();
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct JobsetView {
    name: String,
    project: String,
    enabled: i64,
    hidden: bool,
    branch: Option<String>,
    attributes: Vec<String>,
    systems: Vec<String>,
    flakedir: String,
    pullrequests: bool,
    checkinterval: i64,
    schedulingshares: i64,
    keepnr: i64,
    errormsg: Option<String>,
    errortime: Option<i64>,
    lastcheckedtime: Option<i64>,
    triggertime: Option<i64>,
    /// A pull request's number, author and the author's association.
    #[serde(skip_serializing_if = "Option::is_none")]
    pullrequest: Option<PullRequestView>,
    /// The running evaluation, with the jobs it found so far.
    evaluating: Option<EvalView>,
    evals: Vec<EvalView>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PullRequestView {
    number: i64,
    author: Option<String>,
    association: Option<String>,
    head: Option<String>,
    /// Nothing of it is fetched, evaluated or built until approved.
    awaitingapproval: bool,
    approvedby: Option<String>,
    approvedat: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EvalView {
    id: i64,
    project: String,
    jobset: String,
    status: String,
    timestamp: i64,
    evaltime: Option<f64>,
    flake: String,
    commit: String,
    #[serde(rename = "ref")]
    git_ref: String,
    lockhash: Option<String>,
    hasnewbuilds: i64,
    nrjobs: i64,
    nrerrors: i64,
    nrnewbuilds: i64,
    jobsnew: i64,
    jobsremoved: i64,
    jobschanged: i64,
    errorsnew: i64,
    error: Option<String>,
}

fn eval_view(e: Evaluation, project: &str, jobset: &str) -> EvalView {
    EvalView {
        id: e.id,
        project: project.to_string(),
        jobset: jobset.to_string(),
        status: e.status,
        timestamp: e.started_at,
        evaltime: e.duration_ms.map(|ms| ms as f64 / 1000.0),
        flake: e.flake_ref,
        commit: e.commit_sha,
        git_ref: e.git_ref,
        lockhash: e.lock_hash,
        hasnewbuilds: (e.new_builds > 0) as i64,
        nrjobs: e.jobs,
        nrerrors: e.error_jobs,
        nrnewbuilds: e.new_builds,
        jobsnew: e.jobs_new,
        jobsremoved: e.jobs_removed,
        jobschanged: e.jobs_changed,
        errorsnew: e.errors_new,
        error: e.error,
    }
}

async fn find_jobset(s: &AppState, project: &str, name: &str) -> Result<Jobset, WebError> {
    let mut c = s.db.conn().await?;
    jobsets::get(c.ex(), project, name).await?.ok_or_else(|| WebError::NotFound(format!("jobset {project}:{name}")))
}

pub async fn get_jobset(
    State(s): State<AppState>,
    Path((project, name)): Path<(String, String)>,
) -> Result<Json<JobsetView>, WebError> {
    let j = find_jobset(&s, &project, &name).await?;
    let mut c = s.db.conn().await?;
    let evaluating = evaluations::running(c.ex(), j.id).await?.map(|e| eval_view(e, &project, &name));
    let evals = evaluations::latest(c.ex(), j.id, 10)
        .await?
        .into_iter()
        .filter(|e| e.status != "running")
        .map(|e| eval_view(e, &project, &name))
        .collect();
    let pullrequest = j.pr_number.map(|number| PullRequestView {
        number,
        author: j.pr_author.clone(),
        association: j.pr_association.clone(),
        head: j.pr_head_sha.clone(),
        awaitingapproval: !j.approved_for(None),
        approvedby: j.approved_by.clone(),
        approvedat: j.approved_sha.clone(),
    });
    Ok(Json(JobsetView {
        pullrequest,
        attributes: j.attribute_list(),
        systems: j.system_list(),
        name: j.name,
        project,
        enabled: j.enabled as i64,
        hidden: j.hidden,
        branch: j.branch,
        flakedir: j.flake_dir,
        pullrequests: j.pull_requests,
        checkinterval: j.check_interval,
        schedulingshares: j.scheduling_shares,
        keepnr: j.keep_evaluations,
        errormsg: j.error,
        errortime: j.error_at,
        lastcheckedtime: j.last_checked_at,
        triggertime: j.trigger_at,
        evaluating,
        evals,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EvalsView {
    evals: Vec<EvalListed>,
    /// Hydra's paging links: `?page=N`.
    first: String,
    next: Option<String>,
    prev: Option<String>,
    last: String,
}

/// An evaluation in the list, with what Hydra's list has besides.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EvalListed {
    #[serde(flatten)]
    eval: EvalView,
    /// Build ids of its jobs.
    builds: Vec<i64>,
    /// Hydra's fetch time; Kiln's fetch is part of the evaluation.
    checkouttime: i64,
    /// Hydra's inputs: the flake's repository at the evaluated commit.
    jobsetevalinputs: BTreeMap<String, EvalInput>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EvalInput {
    #[serde(rename = "type")]
    kind: String,
    uri: String,
    revision: String,
    value: Option<String>,
    dependency: Option<i64>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct PageQuery {
    /// From 1; 20 evaluations a page, newest first.
    page: Option<i64>,
}

const EVALS_PER_PAGE: i64 = 20;

#[utoipa::path(get, path = "/jobset/{project}/{jobset}/evals", tag = "projects", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), PageQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the jobset's evaluations, 20 a page, newest first, as Hydra lists them", body = EvalsView), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn get_jobset_evals(
    State(s): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
) -> Result<Json<EvalsView>, WebError> {
    let j = find_jobset(&s, &project, &name).await?;
    let mut c = s.db.conn().await?;
    let repo = projects::get_by_id(c.ex(), j.project_id).await?.map(|p| p.repo).unwrap_or_default();
    let page = q.page.unwrap_or(1).max(1);
    let (list, total) = evaluations::page(c.ex(), j.id, (page - 1) * EVALS_PER_PAGE, EVALS_PER_PAGE).await?;
    let ids: Vec<i64> = list.iter().map(|e| e.id).collect();
    let mut builds: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (eval, build) in evaluations::build_ids(c.ex(), &ids).await? {
        builds.entry(eval).or_default().push(build);
    }
    let evals = list
        .into_iter()
        .map(|e| {
            let input = EvalInput {
                kind: "git".into(),
                uri: repo.clone(),
                revision: e.commit_sha.clone(),
                value: None,
                dependency: None,
            };
            EvalListed {
                builds: builds.remove(&e.id).unwrap_or_default(),
                checkouttime: 0,
                jobsetevalinputs: BTreeMap::from([("src".to_string(), input)]),
                eval: eval_view(e, &project, &name),
            }
        })
        .collect();
    let last = ((total + EVALS_PER_PAGE - 1) / EVALS_PER_PAGE).max(1);
    Ok(Json(EvalsView {
        evals,
        first: "?page=1".into(),
        next: (page < last).then(|| format!("?page={}", page + 1)),
        prev: (page > 1).then(|| format!("?page={}", page - 1)),
        last: format!("?page={last}"),
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EvalDetail {
    #[serde(flatten)]
    eval: EvalView,
    /// Build ids of the evaluation's jobs (Hydra's `builds`).
    builds: Vec<i64>,
    /// Job name to build id.
    jobs: BTreeMap<String, i64>,
    /// Job name to its evaluation error.
    errors: BTreeMap<String, String>,
    stderr: Option<String>,
    diff: evaluations::Diff,
}

pub async fn get_eval(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Json<EvalDetail>, WebError> {
    let mut c = s.db.conn().await?;
    let e = evaluations::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let j =
        jobsets::get_by_id(c.ex(), e.jobset_id).await?.ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let p = projects::get_by_id(c.ex(), j.project_id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let members = evaluations::members(c.ex(), id).await?;
    let mut builds = Vec::new();
    let mut jobs = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for m in members {
        match (m.build_id, m.error) {
            (Some(b), _) => {
                builds.push(b);
                jobs.insert(m.job, b);
            }
            (None, Some(err)) => {
                errors.insert(m.job, err);
            }
            _ => {}
        }
    }
    builds.sort_unstable();
    builds.dedup();
    let cur = evaluations::member_states(c.ex(), id).await?;
    let prev = match e.prev_eval_id {
        Some(p) => evaluations::member_states(c.ex(), p).await?,
        None => Vec::new(),
    };
    // A pruned previous evaluation leaves only the counts.
    let diff = if e.prev_eval_id.is_some() && prev.is_empty() {
        evaluations::Diff { prev_eval_id: e.prev_eval_id, ..Default::default() }
    } else {
        evaluations::diff(e.prev_eval_id, &prev, &cur)
    };
    let stderr = e.stderr.clone();
    Ok(Json(EvalDetail { eval: eval_view(e, &p.name, &j.name), builds, jobs, errors, stderr, diff }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct PushQuery {
    /// Comma-separated `project:jobset` names.
    #[param(value_type = String, required = true, pattern = "^[^,:]+:[^,:]+(,[^,:]+:[^,:]+)*$")]
    jobsets: Option<String>,
    /// `1` evaluates even when the commit has not changed.
    #[param(value_type = String)]
    force: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PushResult {
    #[serde(rename = "jobsetsTriggered")]
    jobsets_triggered: Vec<String>,
}

/// `POST /api/push?jobsets=p:j,p2:j2[&force=1]`: evaluate these now.
#[utoipa::path(post, path = "/api/push", tag = "actions", params(PushQuery), security(("token" = [])),
    responses((status = 200, description = "the jobsets will be evaluated now", body = PushResult),
        (status = 400, description = "no or malformed list", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn push(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<PushQuery>,
) -> Result<Json<PushResult>, WebError> {
    auth::require(&s, &headers).await?;
    let list = q
        .jobsets
        .filter(|l| !l.trim().is_empty())
        .ok_or_else(|| WebError::BadRequest("give ?jobsets=project:jobset,…".into()))?;
    let force = matches!(q.force.as_deref(), Some("1" | "true" | "yes"));
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    let mut c = s.db.conn().await?;
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((p, j)) = item.split_once(':') else {
            return Err(WebError::BadRequest(format!("{item:?} is not project:jobset")));
        };
        match jobsets::get(c.ex(), p, j).await? {
            Some(js) => found.push((item.to_string(), js.id)),
            None => unknown.push(item.to_string()),
        }
    }
    // All or nothing: a typo does not leave half the list triggered.
    if !unknown.is_empty() {
        return Err(WebError::NotFound(format!("jobsets {}", unknown.join(", "))));
    }
    let mut triggered = Vec::new();
    for (item, id) in found {
        jobsets::trigger(c.ex(), id, force).await?;
        triggered.push(item);
    }
    s.evaluator.wake();
    Ok(Json(PushResult { jobsets_triggered: triggered }))
}
