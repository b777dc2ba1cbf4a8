//! The HTML pages. Each handler loads what its page shows into a plain
//! struct and renders a template from `templates/`; the same URL answers
//! JSON for `Accept: application/json` (through `api`).

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::{AppState, ErrorBody, WebError, api, builds as build_api, wants_json};
use crate::db::builds::{self, BuildStatus};
use crate::db::{evaluations, jobsets, projects, steps};

/// What the page header needs: whether the viewer is signed in, and the
/// CSRF token its forms carry.
#[derive(Default)]
pub struct Nav {
    pub signed_in: bool,
    pub csrf: String,
}

pub fn nav(s: &AppState, headers: &HeaderMap) -> Nav {
    match super::actions::signed_in(s, headers) {
        Some(csrf) => Nav { signed_in: true, csrf },
        None => Nav::default(),
    }
}

/// Seconds since the epoch as `2026-11-24 08:01:02 UTC`.
pub fn when(ts: i64) -> String {
    let days = ts.div_euclid(86400);
    let secs = ts.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

pub fn when_opt(ts: Option<i64>) -> String {
    ts.map(when).unwrap_or_else(|| "–".into())
}

/// A duration as `1h 2m`, `3m 4s` or `5s`.
pub fn duration(secs: i64) -> String {
    let s = secs.max(0);
    if s >= 3600 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A build's status for people, and the CSS class that colours it.
pub fn status_of(finished: bool, status: Option<i64>) -> (String, &'static str) {
    if !finished {
        return ("queued".into(), "queued");
    }
    match status.and_then(BuildStatus::from_i64) {
        Some(BuildStatus::Succeeded) => ("succeeded".into(), "ok"),
        Some(s @ (BuildStatus::Cancelled | BuildStatus::Aborted | BuildStatus::Unsupported)) => {
            (s.label().into(), "other")
        }
        Some(s) => (s.label().into(), "bad"),
        None => ("unknown".into(), "other"),
    }
}

#[derive(Clone)]
pub struct Row {
    pub id: i64,
    pub project: String,
    pub jobset: String,
    pub job: String,
    pub name: String,
    pub system: String,
    pub status: String,
    pub class: &'static str,
    pub finished_at: String,
    pub took: String,
}

fn row(b: builds::Listed) -> Row {
    let (status, class) = status_of(b.finished, b.build_status);
    Row {
        took: match (b.start_time, b.stop_time) {
            (Some(a), Some(z)) => duration(z - a),
            _ => String::new(),
        },
        finished_at: when_opt(b.stop_time),
        id: b.id,
        project: b.project,
        jobset: b.jobset,
        job: b.job,
        name: b.nix_name,
        system: b.system,
        status,
        class,
    }
}

fn html(t: impl Template) -> Result<Response, WebError> {
    Ok(Html(t.render()?).into_response())
}

// ------------------------------------------------------------------ home

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    title: String,
    nav: Nav,
    public_key: String,
    base_url: String,
    projects: Vec<ProjectLine>,
    queued: i64,
    running: usize,
    recent: Vec<Row>,
}

struct ProjectLine {
    name: String,
    display: String,
    description: String,
    jobsets: usize,
    error: Option<String>,
}

#[utoipa::path(get, path = "/", tag = "pages",
    responses((status = 200, description = "the projects that are not hidden", content((Vec<api::ProjectView> = "application/json"), (String = "text/html")))))]
pub async fn home(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(axum::Json(api::list_projects(&s).await?).into_response());
    }
    let mut c = s.db.conn().await?;
    let list: Vec<_> = projects::list(c.ex()).await?.into_iter().filter(|p| !p.hidden).collect();
    let mut shown: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    for (project, _, hidden) in jobsets::names(c.ex()).await? {
        *shown.entry(project).or_default() += usize::from(!hidden);
    }
    let mut lines = Vec::new();
    for p in list {
        let n = shown.get(&p.id).copied().unwrap_or(0);
        lines.push(ProjectLine {
            display: if p.display_name.is_empty() { p.name.clone() } else { p.display_name.clone() },
            name: p.name,
            description: p.description,
            jobsets: n,
            error: p.error,
        });
    }
    let queued = builds::count_unfinished(c.ex()).await?;
    let running = steps::running(c.ex()).await?.len();
    let recent = builds::recent(c.ex(), 20).await?.into_iter().map(row).collect();
    html(HomePage {
        nav: nav(&s, &headers),
        title: "Kiln".into(),
        public_key: s.public_key.to_string(),
        base_url: s.config.base_url(),
        projects: lines,
        queued,
        running,
        recent,
    })
}

// ------------------------------------------------------------------ project

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
            branch: j
                .branch
                .clone()
                .unwrap_or_else(|| if j.pull_requests { "pull requests".into() } else { "default branch".into() }),
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

// ------------------------------------------------------------------ jobset

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

// ------------------------------------------------------------------ evaluation

#[derive(Template)]
#[template(path = "eval.html")]
struct EvalPage {
    title: String,
    nav: Nav,
    project: String,
    jobset: String,
    e: evaluations::Evaluation,
    started: String,
    took: String,
    diff: evaluations::Diff,
    fixed: Vec<String>,
    broken: Vec<String>,
    errors: Vec<(String, String)>,
    builds: Vec<Row>,
}

#[utoipa::path(get, path = "/eval/{id}", tag = "pages", params(("id" = i64, Path, description = "evaluation id", minimum = 1)),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "an evaluation, its jobs and what changed", content((api::EvalDetail = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn eval(State(s): State<AppState>, Path(id): Path<i64>, headers: HeaderMap) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(api::get_eval(State(s), Path(id)).await?.into_response());
    }
    let d = match s.memo.evals.get(&id) {
        Some(d) => d,
        None => {
            let d = Arc::new(eval_data(&s, id).await?);
            s.memo.evals.put(id, d.e.jobset_id, d.generation, d.clone());
            d
        }
    };
    html(EvalPage {
        nav: nav(&s, &headers),
        title: format!("Evaluation {id} of {}:{} · Kiln", d.project, d.jobset),
        project: d.project.clone(),
        jobset: d.jobset.clone(),
        started: when(d.e.started_at),
        took: d.e.duration_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_default(),
        e: d.e.clone(),
        diff: d.diff.clone(),
        fixed: d.fixed.clone(),
        broken: d.broken.clone(),
        errors: d.errors.clone(),
        builds: d.builds.clone(),
    })
}

/// What the evaluation page shows, as read from the database.
pub struct EvalData {
    project: String,
    jobset: String,
    e: evaluations::Evaluation,
    diff: evaluations::Diff,
    fixed: Vec<String>,
    broken: Vec<String>,
    errors: Vec<(String, String)>,
    builds: Vec<Row>,
    generation: (u64, u64),
}

async fn eval_data(s: &AppState, id: i64) -> Result<EvalData, WebError> {
    let mut c = s.db.conn().await?;
    let e = evaluations::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let generation = s.memo.evals.generations().of(e.jobset_id);
    let j =
        jobsets::get_by_id(c.ex(), e.jobset_id).await?.ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let p = projects::get_by_id(c.ex(), j.project_id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let cur = evaluations::member_states(c.ex(), id).await?;
    let prev = match e.prev_eval_id {
        Some(pid) => evaluations::member_states(c.ex(), pid).await?,
        None => Vec::new(),
    };
    let diff = evaluations::diff(e.prev_eval_id, &prev, &cur);
    let members = evaluations::members(c.ex(), id).await?;
    let ids: Vec<i64> = members.iter().filter_map(|m| m.build_id).collect();
    let listed = builds::listed(c.ex(), &ids).await?;
    // Fixed and broken: against the previous evaluation's builds.
    let mut fixed = Vec::new();
    let mut broken = Vec::new();
    if let Some(pid) = e.prev_eval_id {
        let before: BTreeMap<String, (Option<bool>, Option<i64>)> = evaluations::cells(c.ex(), &[pid])
            .await?
            .into_iter()
            .map(|c| (c.job, (c.finished, c.build_status)))
            .collect();
        for b in &listed {
            if !b.finished {
                continue;
            }
            if let Some((Some(true), st)) = before.get(&b.job) {
                let was_ok = *st == Some(0);
                let is_ok = b.build_status == Some(0);
                if was_ok && !is_ok {
                    broken.push(b.job.clone());
                } else if !was_ok && is_ok {
                    fixed.push(b.job.clone());
                }
            }
        }
    }
    let errors = members.into_iter().filter_map(|m| m.error.map(|e| (m.job, e))).collect();
    Ok(EvalData {
        project: p.name,
        jobset: j.name,
        e,
        diff,
        fixed,
        broken,
        errors,
        builds: listed.into_iter().map(row).collect(),
        generation,
    })
}

// ------------------------------------------------------------------ build

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    title: String,
    nav: Nav,
    b: Row,
    drv: String,
    description: String,
    queued_at: String,
    started: String,
    finished: String,
    error: Option<String>,
    outputs: Vec<(String, String, String)>,
    steps: Vec<StepLine>,
    /// How many steps were built and how many substituted from upstreams.
    step_summary: String,
    evals: Vec<i64>,
    running: bool,
    /// Pinned: garbage collection keeps its outputs.
    keep: bool,
    /// For an aggregate: its constituents (build id, job, status, class).
    constituents: Vec<(i64, String, String, &'static str)>,
}

struct StepLine {
    id: i64,
    drv_base: String,
    state: String,
    class: &'static str,
    machine: String,
    took: String,
    phase: String,
    tries: i64,
}

#[utoipa::path(get, path = "/build/{id}", tag = "pages", params(("id" = i64, Path, description = "build id", minimum = 1)),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "a build", content((build_api::BuildView = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn build(State(s): State<AppState>, Path(id): Path<i64>, headers: HeaderMap) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(build_api::get_build(State(s), Path(id)).await?.into_response());
    }
    let mut c = s.db.conn().await?;
    let b = builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let listed = builds::listed(c.ex(), &[id])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let outputs = builds::outputs(c.ex(), id)
        .await?
        .into_iter()
        .map(|o| {
            let hash = o.path.trim_start_matches("/nix/store/").chars().take(32).collect::<String>();
            (o.name, o.path, hash)
        })
        .collect();
    let steps = match b.top_step_id {
        Some(top) => steps::closure_of(c.ex(), top).await?,
        None => Vec::new(),
    };
    let running = steps.iter().any(|s| s.state == "running");
    let step_summary = step_summary(&steps);
    let constituents = if b.is_aggregate {
        builds::constituent_states(c.ex(), id)
            .await?
            .into_iter()
            .map(|(cid, job, finished, st)| {
                let (status, class) = status_of(finished, st);
                (cid, job, status, class)
            })
            .collect()
    } else {
        Vec::new()
    };
    let steps = steps
        .into_iter()
        .map(|st| {
            let class = match st.state.as_str() {
                "succeeded" | "substituted" => "ok",
                "failed" | "aborted" => "bad",
                "running" => "running",
                _ => "queued",
            };
            StepLine {
                drv_base: st.drv_path.trim_start_matches("/nix/store/").to_string(),
                took: match (st.start_time, st.stop_time) {
                    (Some(a), Some(z)) => duration(z - a),
                    (Some(a), None) if st.state == "running" => format!("{} so far", duration(crate::db::now() - a)),
                    _ => String::new(),
                },
                id: st.id,
                state: st.state,
                class,
                machine: st.machine.map(|m| m.split('?').next().unwrap_or("").to_string()).unwrap_or_default(),
                phase: st.phase.unwrap_or_default(),
                tries: st.tries,
            }
        })
        .collect();
    let evals = evaluations::of_build(c.ex(), id).await?;
    html(BuildPage {
        nav: nav(&s, &headers),
        title: format!("Build {id}: {} · Kiln", b.job),
        drv: b.drv_path.clone(),
        description: b.description.clone().unwrap_or_default(),
        queued_at: when(b.created_at),
        started: when_opt(b.start_time),
        finished: when_opt(b.stop_time),
        error: b.error.clone(),
        b: row(listed),
        outputs,
        steps,
        step_summary,
        evals,
        running,
        keep: b.keep,
        constituents,
    })
}

/// "2 built, 14 substituted": what a build's closure took.
pub(crate) fn step_summary(steps: &[crate::db::steps::Step]) -> String {
    let n = |state: &str| steps.iter().filter(|s| s.state == state).count();
    let (built, substituted) = (n("succeeded"), n("substituted"));
    let rest = steps.len() - built - substituted;
    let mut parts = vec![format!("{built} built"), format!("{substituted} substituted from upstream caches")];
    if rest > 0 {
        parts.push(format!("{rest} not built yet or failed"));
    }
    parts.join(", ")
}

// ------------------------------------------------------------------ logs

#[derive(Template)]
#[template(path = "log.html")]
struct LogPage {
    title: String,
    nav: Nav,
    build: i64,
    drv: String,
    lines_html: String,
    truncated: usize,
    live: bool,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// Which derivation of the build (default: the build's own), as a store path or base name.
    drv: Option<String>,
    /// Any value: the whole log (up to 16 MiB on the page), not its tail.
    full: Option<String>,
    /// Any value: raw text, streamed live while the step builds.
    follow: Option<String>,
}

/// Lines shown by default for a large log: its tail.
const TAIL_LINES: usize = 2000;

#[utoipa::path(get, path = "/build/{id}/log", tag = "pages", params(("id" = i64, Path, description = "build id", minimum = 1), LogQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the log: a page for `Accept: text/html` (its tail unless `full`), else raw text",
        content((String = "text/html"), (String = "text/plain"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn build_log(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let b = builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let drv = match q.drv {
        Some(d) if d.ends_with(".drv") => {
            if d.starts_with('/') {
                d
            } else {
                format!("/nix/store/{d}")
            }
        }
        _ => b.drv_path.clone(),
    };
    drop(c);
    if q.follow.is_some() {
        return Ok(super::live::follow_log(&s, &drv).await);
    }
    let plain =
        !headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    let tail = if q.full.is_some() { None } else { Some(TAIL_LINES) };
    // A stored log is streamed, or read through keeping only what is shown.
    let (shown, truncated) = match s.logs.open(&drv) {
        Some(r) if plain => {
            let body = super::live::stream_reader(r);
            return Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response());
        }
        Some(_) => {
            let (logs, d) = (s.logs.clone(), drv.clone());
            tokio::task::spawn_blocking(move || logs.lines(&d, tail)).await.ok().flatten().unwrap_or_default()
        }
        None => {
            let (so_far, _) = s.logs.follow(&drv).ok_or_else(|| WebError::NotFound(format!("a log of {drv}")))?;
            if plain {
                return Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], so_far).into_response());
            }
            crate::logs::lines_of(&so_far[..], tail)
        }
    };
    let start = truncated;
    let live = s.logs.follow(&drv).is_some();
    html(LogPage {
        nav: nav(&s, &headers),
        title: format!("Log of build {id} · Kiln"),
        build: id,
        drv: drv.trim_start_matches("/nix/store/").to_string(),
        lines_html: super::ansi::to_html(&shown, start + 1),
        truncated,
        live,
    })
}

// ------------------------------------------------------------------ job

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    title: String,
    nav: Nav,
    project: String,
    jobset: String,
    job: String,
    builds: Vec<Row>,
    /// Points of the duration chart: (x, y, build id, label).
    chart: Vec<(f64, f64, i64, String)>,
    chart_max: String,
    first_failure: Option<i64>,
    older: Option<i64>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct Page {
    /// Builds older than this build id.
    before: Option<i64>,
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}", tag = "pages", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("job" = String, Path, description = "job name (attribute path)"), Page),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the job's builds, newest first, 50 a page", content((Vec<build_api::BuildSummary> = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn job(
    State(s): State<AppState>,
    Path((project, jobset, job)): Path<(String, String, String)>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), &project, &jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?;
    let list = builds::job_history(c.ex(), j.id, &job, page.before.unwrap_or(i64::MAX), 50).await?;
    if wants_json(&headers) {
        let list: Vec<build_api::BuildSummary> = list.into_iter().map(Into::into).collect();
        return Ok(axum::Json(list).into_response());
    }
    // The first failure of the current failing streak.
    let mut first_failure = None;
    for b in list.iter().filter(|b| b.finished) {
        if b.build_status == Some(0) {
            break;
        }
        first_failure = Some(b.id);
    }
    let durations: Vec<(i64, i64)> =
        list.iter().rev().filter_map(|b| Some((b.id, b.stop_time? - b.start_time?))).collect();
    let max = durations.iter().map(|(_, d)| *d).max().unwrap_or(1).max(1);
    let n = durations.len().max(2) as f64 - 1.0;
    let chart = durations
        .iter()
        .enumerate()
        .map(|(i, (id, d))| (10.0 + 580.0 * i as f64 / n, 110.0 - 100.0 * *d as f64 / max as f64, *id, duration(*d)))
        .collect();
    let older = (list.len() == 50).then(|| list.last().map(|b| b.id)).flatten();
    html(JobPage {
        nav: nav(&s, &headers),
        title: format!("{job} in {project}:{jobset} · Kiln"),
        chart_max: duration(max),
        builds: list.into_iter().map(row).collect(),
        project,
        jobset,
        job,
        chart,
        first_failure,
        older,
    })
}

// ------------------------------------------------------------------ queue and machines

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage {
    title: String,
    nav: Nav,
    running: Vec<StepLine>,
    runnable: Vec<StepLine>,
    builds: Vec<Row>,
    unfinished: i64,
}

fn step_line(st: steps::Step) -> StepLine {
    StepLine {
        drv_base: st.drv_path.trim_start_matches("/nix/store/").to_string(),
        took: st.start_time.map(|a| duration(crate::db::now() - a)).unwrap_or_default(),
        id: st.id,
        class: if st.state == "running" { "running" } else { "queued" },
        state: st.state,
        machine: st.machine.map(|m| m.split('?').next().unwrap_or("").to_string()).unwrap_or_default(),
        phase: st.phase.unwrap_or_default(),
        tries: st.tries,
    }
}

#[utoipa::path(get, path = "/queue", tag = "pages",
    responses((status = 200, description = "running and runnable steps, queued builds", content((QueueView = "application/json"), (String = "text/html")))))]
pub async fn queue(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let running = steps::running(c.ex()).await?;
    let runnable = steps::runnable(c.ex(), 200).await?;
    let queued = builds::queued(c.ex(), 200).await?;
    let unfinished = builds::count_unfinished(c.ex()).await?;
    if wants_json(&headers) {
        return Ok(axum::Json(QueueView {
            running: running.into_iter().map(Into::into).collect(),
            runnable: runnable.into_iter().map(Into::into).collect(),
            builds: queued.into_iter().map(Into::into).collect(),
            unfinished,
        })
        .into_response());
    }
    html(QueuePage {
        nav: nav(&s, &headers),
        title: "Queue · Kiln".into(),
        running: running.into_iter().map(step_line).collect(),
        runnable: runnable.into_iter().map(step_line).collect(),
        builds: queued.into_iter().map(row).collect(),
        unfinished,
    })
}

#[derive(Template)]
#[template(path = "machines.html")]
struct MachinesPage {
    title: String,
    nav: Nav,
    machines: Vec<MachineLine>,
    machines_file: Option<String>,
    file_errors: Vec<MachineFileError>,
    outbox: crate::db::outbox::Stats,
    github: bool,
}

/// The queue as JSON.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct QueueView {
    running: Vec<build_api::StepView>,
    /// Steps waiting for a free machine, first to be dispatched first.
    runnable: Vec<build_api::StepView>,
    /// Unfinished builds, highest priority first.
    builds: Vec<build_api::BuildSummary>,
    unfinished: i64,
}

/// The machines as JSON.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MachinesView {
    machines: Vec<MachineLine>,
    /// The machines file the page read (none: this machine builds).
    machines_file: Option<String>,
    /// Entries of the machines file Kiln cannot use, and why.
    errors: Vec<MachineFileError>,
    /// GitHub statuses waiting to be sent.
    outbox: crate::db::outbox::Stats,
}

/// Search results as JSON.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SearchView {
    projects: Vec<String>,
    /// `project:jobset` names.
    jobsets: Vec<String>,
    builds: Vec<build_api::BuildSummary>,
}

/// An entry of the machines file that Kiln cannot use.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MachineFileError {
    /// Its line number (none when the file itself cannot be read).
    line: Option<usize>,
    /// The entry as written.
    entry: String,
    reason: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MachineLine {
    uri: String,
    name: String,
    systems: String,
    features: String,
    /// How Kiln talks to it (`ssh-ng://` machines: the serve protocol to
    /// the `nix-store` beside their `nix-daemon`).
    protocol: String,
    /// The command Kiln runs there.
    command: String,
    /// Store settings Nix accepts that have no effect on Kiln's builds.
    inert_settings: Vec<String>,
    running: u32,
    slots: u32,
    speed: f64,
    paused: Option<String>,
    enabled: bool,
    consecutive_failures: i64,
    last_error: Option<String>,
    steps_done: i64,
    current: Vec<String>,
    recent_failures: Vec<String>,
    /// Its URL (the URI, percent-encoded): POST `{path}/disable` or
    /// `{path}/enable` with a token.
    path: String,
}

/// The machines Kiln builds on, the machines-file entries it cannot use and
/// the file's name. Read here rather than taken from the queue runner, which
/// a `--roles web` process does not have; the file is small.
pub fn configured_machines(
    config: &crate::config::Config,
) -> (Vec<crate::builder::machines::Machine>, Vec<MachineFileError>, Option<String>) {
    match crate::build::machine_source(config, None) {
        crate::queue::MachineSource::File(f) => {
            let (list, errors) = match crate::builder::machines::load(&f) {
                Ok((list, errors)) => (
                    list,
                    errors
                        .into_iter()
                        .map(|e| MachineFileError { line: Some(e.line), entry: e.entry, reason: e.reason })
                        .collect(),
                ),
                Err(e) => (
                    vec![],
                    vec![MachineFileError { line: None, entry: String::new(), reason: format!("cannot read it: {e}") }],
                ),
            };
            (list, errors, Some(f.display().to_string()))
        }
        crate::queue::MachineSource::List(l) => (l, vec![], None),
    }
}

#[utoipa::path(get, path = "/machines", tag = "pages",
    responses((status = 200, description = "the build machines", content((MachinesView = "application/json"), (String = "text/html")))))]
pub async fn machines(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    let status = s.queue.status.lock().expect("status").clone();
    let (list, file_errors, machines_file) = configured_machines(&s.config);
    let mut c = s.db.conn().await?;
    let running_steps = steps::running(c.ex()).await?;
    let mut lines = Vec::new();
    for m in list {
        let st = crate::db::machines::get(c.ex(), &m.uri).await?;
        let failures = steps::failed_on(c.ex(), &m.uri, 5).await?;
        let running = status.machines.iter().find(|(u, _, _)| *u == m.uri).map(|(_, r, _)| *r).unwrap_or(0);
        lines.push(MachineLine {
            name: m.uri.split('?').next().unwrap_or(&m.uri).to_string(),
            systems: m.systems.join(", "),
            features: m.supported_features.join(", "),
            protocol: m.protocol(),
            command: m.remote_command(),
            inert_settings: m.inert_settings.clone(),
            running,
            slots: m.max_jobs,
            speed: m.speed_factor,
            paused: st.as_ref().and_then(|s| s.paused_until).filter(|t| *t > crate::db::now()).map(when),
            enabled: st.as_ref().is_none_or(|s| s.enabled),
            consecutive_failures: st.as_ref().map(|s| s.consecutive_failures).unwrap_or(0),
            last_error: st.as_ref().and_then(|s| s.last_error.clone()),
            steps_done: st.as_ref().map(|s| s.steps_done).unwrap_or(0),
            current: running_steps
                .iter()
                .filter(|r| r.machine.as_deref() == Some(&m.uri))
                .map(|r| r.drv_path.clone())
                .collect(),
            recent_failures: failures.into_iter().map(|f| f.drv_path).collect(),
            path: format!("/machines/{}", super::actions::path_segment(&m.uri)),
            uri: m.uri,
        });
    }
    let outbox = crate::db::outbox::stats(c.ex()).await?;
    if wants_json(&headers) {
        return Ok(
            axum::Json(MachinesView { machines: lines, machines_file, errors: file_errors, outbox }).into_response()
        );
    }
    html(MachinesPage {
        nav: nav(&s, &headers),
        title: "Machines · Kiln".into(),
        machines: lines,
        machines_file,
        file_errors,
        outbox,
        github: s.config.github.is_some(),
    })
}

// ------------------------------------------------------------------ search

#[derive(Template)]
#[template(path = "search.html")]
struct SearchPage {
    title: String,
    nav: Nav,
    q: String,
    projects: Vec<projects::Project>,
    jobsets: Vec<(String, String)>,
    builds: Vec<Row>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct SearchQuery {
    /// At least two characters.
    q: Option<String>,
}

/// Projects, jobsets, jobs, derivations and store paths containing `q`.
#[utoipa::path(get, path = "/search", tag = "pages", params(SearchQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "projects, jobsets and builds matching `q`", content((SearchView = "application/json"), (String = "text/html")))))]
pub async fn search(
    State(s): State<AppState>,
    Query(q): Query<SearchQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let q = q.q.unwrap_or_default().trim().to_string();
    let mut c = s.db.conn().await?;
    let (mut found_projects, mut found_jobsets, mut found) = (Vec::new(), Vec::new(), Vec::new());
    if q.len() >= 2 {
        let lower = q.to_lowercase();
        for p in projects::list(c.ex()).await? {
            for j in jobsets::list_for_project(c.ex(), p.id).await? {
                if j.name.to_lowercase().contains(&lower) {
                    found_jobsets.push((p.name.clone(), j.name));
                }
            }
            if p.name.to_lowercase().contains(&lower) || p.display_name.to_lowercase().contains(&lower) {
                found_projects.push(p);
            }
        }
        found = builds::search(c.ex(), &q, 50).await?;
    }
    if wants_json(&headers) {
        return Ok(axum::Json(SearchView {
            projects: found_projects.into_iter().map(|p| p.name).collect(),
            jobsets: found_jobsets.iter().map(|(p, j)| format!("{p}:{j}")).collect(),
            builds: found.into_iter().map(Into::into).collect(),
        })
        .into_response());
    }
    html(SearchPage {
        nav: nav(&s, &headers),
        title: format!("Search {q} · Kiln"),
        q,
        projects: found_projects,
        jobsets: found_jobsets,
        builds: found.into_iter().map(row).collect(),
    })
}
