//! Hydra's own routes that Kiln serves for its clients and scripts
//! (`hydra-api.yaml`, Hydra's API tests, hydra-cli): the jobset overview,
//! the latest builds, the queue and build counts under `/api`, and the
//! build lookups Hydra offers by job, system and evaluation. The answers
//! have Hydra's keys and value types (integers 0/1 where Hydra has them).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};

use super::builds::BuildSummary;
use super::{AppState, ErrorBody, WebError};
use crate::db::{builds, evaluations, jobsets, now, projects};

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ProjectQuery {
    /// The project's name.
    project: String,
}

/// One jobset of Hydra's overview: the counts are of its latest evaluation's builds.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobsetOverview {
    name: String,
    project: String,
    nrtotal: i64,
    nrsucceeded: i64,
    nrfailed: i64,
    nrscheduled: i64,
    /// 1 when the jobset's last check or evaluation failed.
    haserrormsg: i64,
    errortime: Option<i64>,
    fetcherrormsg: Option<String>,
    lastcheckedtime: Option<i64>,
    triggertime: Option<i64>,
    /// When its latest evaluation started.
    starttime: Option<i64>,
    checkinterval: i64,
    enabled: i64,
    hidden: i64,
}

#[utoipa::path(get, path = "/api/jobsets", tag = "hydra", params(ProjectQuery),
    responses((status = 200, description = "Hydra's jobset overview of a project", body = Vec<JobsetOverview>), (status = 400, description = "no project given", body = ErrorBody), (status = 404, description = "no such project", body = ErrorBody)))]
pub async fn jobsets(
    State(s): State<AppState>,
    Query(q): Query<ProjectQuery>,
) -> Result<Json<Vec<JobsetOverview>>, WebError> {
    let mut c = s.db.conn().await?;
    let p =
        projects::get(c.ex(), &q.project).await?.ok_or_else(|| WebError::NotFound(format!("project {}", q.project)))?;
    let mut out = Vec::new();
    for j in jobsets::list_for_project(c.ex(), p.id).await?.into_iter().filter(|j| !j.is_template()) {
        let latest = evaluations::latest(c.ex(), j.id, 1).await?.into_iter().next();
        let cells = match &latest {
            Some(e) => evaluations::cells(c.ex(), &[e.id]).await?,
            None => Vec::new(),
        };
        let with_build: Vec<_> = cells.iter().filter(|c| c.build_id.is_some()).collect();
        let count = |f: &dyn Fn(&&evaluations::Cell) -> bool| with_build.iter().filter(|c| f(c)).count() as i64;
        out.push(JobsetOverview {
            nrtotal: with_build.len() as i64,
            nrsucceeded: count(&|c| c.finished == Some(true) && c.build_status == Some(0)),
            nrfailed: count(&|c| c.finished == Some(true) && c.build_status != Some(0)),
            nrscheduled: count(&|c| c.finished != Some(true)),
            haserrormsg: j.error.is_some() as i64,
            errortime: j.error_at,
            fetcherrormsg: None,
            lastcheckedtime: j.last_checked_at,
            triggertime: j.trigger_at,
            starttime: latest.map(|e| e.started_at),
            checkinterval: j.check_interval,
            enabled: j.enabled as i64,
            hidden: j.hidden as i64,
            name: j.name,
            project: p.name.clone(),
        });
    }
    Ok(Json(out))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LatestQuery {
    /// How many (Hydra requires it; at most 1000).
    nr: Option<i64>,
    project: Option<String>,
    jobset: Option<String>,
    job: Option<String>,
    system: Option<String>,
}

#[utoipa::path(get, path = "/api/latestbuilds", tag = "hydra", params(LatestQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the newest finished builds, newest first", body = Vec<BuildSummary>)))]
pub async fn latest_builds(
    State(s): State<AppState>,
    Query(q): Query<LatestQuery>,
) -> Result<Json<Vec<BuildSummary>>, WebError> {
    let nr = q.nr.unwrap_or(10).clamp(1, 1000);
    let mut c = s.db.conn().await?;
    let list = builds::latest_filtered(
        c.ex(),
        nr,
        q.project.as_deref(),
        q.jobset.as_deref(),
        q.job.as_deref(),
        q.system.as_deref(),
    )
    .await?;
    Ok(Json(list.into_iter().map(Into::into).collect()))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct NrQuery {
    /// How many (at most 1000).
    nr: Option<i64>,
}

#[utoipa::path(get, path = "/api/queue", tag = "hydra", params(NrQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "unfinished builds, next to be built first", body = Vec<BuildSummary>)))]
pub async fn queue(State(s): State<AppState>, Query(q): Query<NrQuery>) -> Result<Json<Vec<BuildSummary>>, WebError> {
    let mut c = s.db.conn().await?;
    let list = builds::queued(c.ex(), q.nr.unwrap_or(100).clamp(1, 1000)).await?;
    Ok(Json(list.into_iter().map(Into::into).collect()))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct CountQuery {
    /// How many periods (at most 1000).
    nr: Option<i64>,
    /// The length of a period (default an hour; a month is 30 days).
    period: Option<Period>,
}

#[derive(Deserialize, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Month,
}

#[utoipa::path(get, path = "/api/nrbuilds", tag = "hydra", params(CountQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "builds finished in each of the last `nr` periods, oldest first", body = Vec<i64>)))]
pub async fn nr_builds(State(s): State<AppState>, Query(q): Query<CountQuery>) -> Result<Json<Vec<i64>>, WebError> {
    let nr = q.nr.unwrap_or(24).clamp(1, 1000);
    let len = match q.period.unwrap_or(Period::Hour) {
        Period::Hour => 3600,
        Period::Day => 86400,
        Period::Month => 30 * 86400,
    };
    let end = now();
    let start = end - nr * len;
    let mut counts = vec![0i64; nr as usize];
    let mut c = s.db.conn().await?;
    for t in builds::stop_times_since(c.ex(), start).await? {
        let i = ((t - start) / len).clamp(0, nr - 1) as usize;
        counts[i] += 1;
    }
    Ok(Json(counts))
}

/// What is queued, per jobset and per system.
#[derive(Serialize, utoipa::ToSchema)]
pub struct QueueSummary {
    jobsets: Vec<QueuedIn>,
    systems: Vec<QueuedIn>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct QueuedIn {
    /// `project:jobset`, or the system.
    name: String,
    queued: i64,
}

#[utoipa::path(get, path = "/queue-summary", tag = "hydra",
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "queued builds per jobset and per system", content((QueueSummary = "application/json"), (String = "text/html")))))]
pub async fn queue_summary(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let mut by_jobset: BTreeMap<String, i64> = BTreeMap::new();
    let mut by_system: BTreeMap<String, i64> = BTreeMap::new();
    for b in builds::queued(c.ex(), 100_000).await? {
        *by_jobset.entry(format!("{}:{}", b.project, b.jobset)).or_default() += 1;
        *by_system.entry(b.system).or_default() += 1;
    }
    let list = |m: BTreeMap<String, i64>| m.into_iter().map(|(name, queued)| QueuedIn { name, queued }).collect();
    let summary = QueueSummary { jobsets: list(by_jobset), systems: list(by_system) };
    if super::wants_json(&headers) {
        return Ok(Json(summary).into_response());
    }
    let rows = |v: &[QueuedIn]| {
        v.iter().map(|q| format!("<tr><td>{}</td><td>{}</td></tr>", escape(&q.name), q.queued)).collect::<String>()
    };
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Queue summary · Kiln</title>\
         <link rel=\"stylesheet\" href=\"/static/style.css\"></head><body><main><h1>Queue summary</h1>\
         <h2>Per jobset</h2><table><tr><th>Jobset</th><th>Queued</th></tr>{}</table>\
         <h2>Per system</h2><table><tr><th>System</th><th>Queued</th></tr>{}</table>\
         <p><a href=\"/queue\">The queue</a></p></main></body></html>",
        rows(&summary.jobsets),
        rows(&summary.systems)
    );
    Ok(axum::response::Html(page).into_response())
}

pub(super) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

async fn jobset_id(s: &AppState, project: &str, jobset: &str) -> Result<i64, WebError> {
    let mut c = s.db.conn().await?;
    Ok(jobsets::get(c.ex(), project, jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?
        .id)
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/latest-finished", tag = "hydra",
    params(("project" = String, Path, description = "project name"), ("jobset" = String, Path, description = "jobset name"), ("job" = String, Path, description = "job name")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 303, description = "to the newest successful build from an evaluation whose builds have all finished"), (status = 404, description = "none yet", body = ErrorBody)))]
pub async fn latest_finished(
    State(s): State<AppState>,
    Path((project, jobset, job)): Path<(String, String, String)>,
) -> Result<Response, WebError> {
    let id = jobset_id(&s, &project, &jobset).await?;
    let mut c = s.db.conn().await?;
    let b = builds::latest_finished(c.ex(), id, &job, None).await?.ok_or_else(|| {
        WebError::NotFound(format!("a finished evaluation with a successful {project}:{jobset}:{job}"))
    })?;
    Ok(Redirect::to(&format!("/build/{}", b.id)).into_response())
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/latest-for/{system}", tag = "hydra",
    params(("project" = String, Path, description = "project name"), ("jobset" = String, Path, description = "jobset name"), ("job" = String, Path, description = "job name"), ("system" = String, Path, description = "e.g. x86_64-linux")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 303, description = "to the newest successful build of the job for that system"), (status = 404, description = "none yet", body = ErrorBody)))]
pub async fn latest_for(
    State(s): State<AppState>,
    Path((project, jobset, job, system)): Path<(String, String, String, String)>,
) -> Result<Response, WebError> {
    let id = jobset_id(&s, &project, &jobset).await?;
    let mut c = s.db.conn().await?;
    let b = builds::latest_finished(c.ex(), id, &job, Some(&system))
        .await?
        .ok_or_else(|| WebError::NotFound(format!("a successful {project}:{jobset}:{job} for {system}")))?;
    Ok(Redirect::to(&format!("/build/{}", b.id)).into_response())
}

#[utoipa::path(get, path = "/eval/{id}/job/{job}", tag = "hydra",
    params(("id" = i64, Path, description = "evaluation id"), ("job" = String, Path, description = "job name")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 303, description = "to the job's build in that evaluation"), (status = 404, description = "no such job there", body = ErrorBody)))]
pub async fn eval_job(State(s): State<AppState>, Path((id, job)): Path<(i64, String)>) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let m = evaluations::members_named(c.ex(), id, std::slice::from_ref(&job)).await?;
    let build = m
        .into_iter()
        .find_map(|m| m.build_id)
        .ok_or_else(|| WebError::NotFound(format!("job {job} with a build in evaluation {id}")))?;
    Ok(Redirect::to(&format!("/build/{build}")).into_response())
}

#[utoipa::path(get, path = "/build/{id}/constituents", tag = "hydra",
    params(("id" = i64, Path, description = "an aggregate build's id")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the builds an aggregate is made of", body = Vec<super::builds::BuildView>), (status = 404, description = "no such build", body = ErrorBody)))]
pub async fn constituents(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, WebError> {
    let ids = {
        let mut c = s.db.conn().await?;
        builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
        builds::constituents(c.ex(), id).await?
    };
    let mut out = Vec::new();
    for b in ids {
        out.push(super::builds::build_json(&s, b).await?);
    }
    Ok(Json(out).into_response())
}

/// shields.io's endpoint badge (`https://img.shields.io/endpoint?url=…`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Shield {
    schema_version: i64,
    label: String,
    message: String,
    color: String,
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/shield", tag = "hydra",
    params(("project" = String, Path, description = "project name"), ("jobset" = String, Path, description = "jobset name"), ("job" = String, Path, description = "job name")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the job's newest build as a shields.io endpoint badge", body = Shield), (status = 404, description = "no such jobset", body = ErrorBody)))]
pub async fn shield(
    State(s): State<AppState>,
    Path((project, jobset, job)): Path<(String, String, String)>,
) -> Result<Json<Shield>, WebError> {
    let id = jobset_id(&s, &project, &jobset).await?;
    let mut c = s.db.conn().await?;
    let newest = builds::job_history(c.ex(), id, &job, i64::MAX, 1).await?.into_iter().next();
    let (message, color) = match newest {
        None => ("not built", "lightgrey"),
        Some(b) if !b.finished => ("queued", "lightgrey"),
        Some(b) if b.build_status == Some(0) => ("passing", "brightgreen"),
        Some(_) => ("failing", "red"),
    };
    Ok(Json(Shield { schema_version: 1, label: "build".into(), message: message.into(), color: color.into() }))
}

#[utoipa::path(get, path = "/build/{id}/download/{nr}/{file}", tag = "hydra",
    params(("id" = i64, Path, description = "build id"), ("nr" = i64, Path, description = "the product's number"), ("file" = String, Path, description = "its file name (for the browser; the number decides)")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the product's file, streamed from the binary cache", content_type = "application/octet-stream"), (status = 404, description = "no such product, or it is not in the cache", body = ErrorBody)))]
pub async fn download(
    State(s): State<AppState>,
    Path((id, nr, _file)): Path<(i64, i64, String)>,
) -> Result<Response, WebError> {
    let missing = || WebError::NotFound(format!("product {nr} of build {id}"));
    let product = {
        let mut c = s.db.conn().await?;
        let b = builds::get(c.ex(), id).await?.ok_or_else(missing)?;
        let top = b.top_step_id.ok_or_else(missing)?;
        crate::db::products::products_of(c.ex(), top).await?.into_iter().find(|p| p.nr == nr).ok_or_else(missing)?
    };
    // `/nix/store/<hash>-<name>` and the file's path inside it.
    let rest = product.path.strip_prefix("/nix/store/").ok_or_else(missing)?;
    let (base, rel) = rest.split_once('/').unwrap_or((rest, ""));
    let mut rel = rel.to_string();
    if !product.default_path.is_empty() {
        rel = [rel.as_str(), product.default_path.as_str()]
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("/");
    }
    if rel.split('/').any(|c| c == ".." || c == ".") {
        return Err(missing());
    }
    let sp = crate::nix::StorePath::parse(&format!("/nix/store/{base}")).map_err(|_| missing())?;
    let ni = s.cache.narinfo(&sp).await.map_err(|e| WebError::Internal(e.to_string()))?.ok_or_else(missing)?;
    let f = match s.cache.storage().reader(&ni.url).await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(missing()),
        Err(e) if e.is_unavailable() => return Err(WebError::Unavailable(e.to_string())),
        Err(e) => return Err(WebError::Internal(e.to_string())),
    };
    let nar =
        crate::nix::compression::decompressing(&ni.compression, f).map_err(|e| WebError::Internal(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
    let (found_tx, found_rx) = tokio::sync::oneshot::channel::<bool>();
    tokio::spawn(extract(nar, rel, tx, found_tx));
    if !found_rx.await.unwrap_or(false) {
        return Err(WebError::NotFound(format!("product {nr} of build {id} is not a file in its output")));
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let name = product.name.replace(['"', '\\', '\r', '\n'], "_");
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (axum::http::header::CONTENT_DISPOSITION, format!("inline; filename=\"{name}\"")),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Streams the regular file at `rel` (inside the NAR's root) to `tx`;
/// says on `found` whether it is there before the first byte.
async fn extract(
    mut nar: impl tokio::io::AsyncRead + Unpin,
    rel: String,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    found: tokio::sync::oneshot::Sender<bool>,
) {
    use tokio::io::AsyncReadExt;
    let mut parser = crate::nix::nar::NarParser::new();
    let mut path: Vec<String> = Vec::new();
    let (mut inside, mut done) = (false, false);
    let mut found = Some(found);
    let mut buf = vec![0u8; 64 * 1024];
    while !done {
        let n = match nar.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunks: Vec<bytes::Bytes> = Vec::new();
        let mut off = 0;
        while off < n && !done {
            let fed = parser.feed(&buf[off..n], &mut |e| match e {
                crate::nix::nar::Event::Directory { name } => path.push(String::from_utf8_lossy(name).into_owned()),
                crate::nix::nar::Event::DirectoryEnd => {
                    path.pop();
                }
                crate::nix::nar::Event::File { name, .. } => {
                    let mut p: Vec<&str> = path.iter().skip(1).map(String::as_str).collect();
                    let name = String::from_utf8_lossy(name);
                    if !name.is_empty() {
                        p.push(&name);
                    }
                    inside = p.join("/") == rel;
                    if inside && let Some(f) = found.take() {
                        let _ = f.send(true);
                    }
                }
                crate::nix::nar::Event::FileData(d) if inside => chunks.push(bytes::Bytes::copy_from_slice(d)),
                crate::nix::nar::Event::FileEnd if inside => {
                    inside = false;
                    done = true;
                }
                _ => {}
            });
            match fed {
                Ok(0) | Err(_) => {
                    done = true;
                }
                Ok(k) => off += k,
            }
        }
        for c in chunks {
            if tx.send(Ok(c)).await.is_err() {
                return;
            }
        }
    }
    if let Some(f) = found.take() {
        let _ = f.send(false);
    }
}
