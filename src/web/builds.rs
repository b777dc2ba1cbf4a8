//! Builds as JSON with Hydra's field names, and the stable "latest green
//! output" URLs deployers (colmena, deploy-rs, nixos-anywhere, scripts)
//! rely on: `/job/{p}/{j}/{job}/latest` redirects to the newest successful
//! build, and `…/latest/output/{out}` answers its store path as text.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Serialize;

use super::{AppState, ErrorBody, WebError};
use crate::db::{builds, evaluations, jobsets, projects};

#[derive(Serialize, utoipa::ToSchema)]
pub struct OutputView {
    path: String,
}

/// A build in a list (job history, queue, search), with Hydra's names.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BuildSummary {
    id: i64,
    project: String,
    jobset: String,
    job: String,
    nixname: String,
    system: String,
    finished: i64,
    buildstatus: Option<i64>,
    timestamp: i64,
    starttime: Option<i64>,
    stoptime: Option<i64>,
}

impl From<builds::Listed> for BuildSummary {
    fn from(b: builds::Listed) -> Self {
        BuildSummary {
            id: b.id,
            project: b.project,
            jobset: b.jobset,
            job: b.job,
            nixname: b.nix_name,
            system: b.system,
            finished: b.finished as i64,
            buildstatus: b.build_status,
            timestamp: b.created_at,
            starttime: b.start_time,
            stoptime: b.stop_time,
        }
    }
}

/// A step of the queue: one derivation to build, shared by every build
/// that needs it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StepView {
    id: i64,
    drvpath: String,
    system: String,
    /// `waiting`, `runnable`, `running`, `succeeded` (built), `substituted`
    /// (taken from an upstream cache, not built), `failed` (remembered as
    /// a cached failure) or `aborted` (not remembered: retried when needed).
    state: String,
    /// While running: connecting, sending inputs, building, receiving outputs, post-processing.
    phase: Option<String>,
    machine: Option<String>,
    tries: i64,
    starttime: Option<i64>,
    stoptime: Option<i64>,
    buildstatus: Option<i64>,
}

impl From<crate::db::steps::Step> for StepView {
    fn from(s: crate::db::steps::Step) -> Self {
        StepView {
            id: s.id,
            drvpath: s.drv_path,
            system: s.system,
            state: s.state,
            phase: s.phase,
            // Machine URIs may carry options after '?'; only the host is shown.
            machine: s.machine.map(|m| m.split('?').next().unwrap_or("").to_string()),
            tries: s.tries,
            starttime: s.start_time,
            stoptime: s.stop_time,
            buildstatus: s.build_status,
        }
    }
}

/// A build with Hydra's field names.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BuildView {
    id: i64,
    project: String,
    jobset: String,
    job: String,
    nixname: String,
    system: String,
    drvpath: String,
    finished: i64,
    buildstatus: Option<i64>,
    timestamp: i64,
    starttime: Option<i64>,
    stoptime: Option<i64>,
    priority: i64,
    iscachedbuild: i64,
    keep: bool,
    description: Option<String>,
    license: Option<String>,
    homepage: Option<String>,
    maintainers: Option<String>,
    buildoutputs: BTreeMap<String, OutputView>,
    jobsetevals: Vec<i64>,
    error: Option<String>,
    /// Steps of the build's closure Kiln built.
    nrbuiltsteps: i64,
    /// Steps of the build's closure substituted from upstream caches.
    nrsubstitutedsteps: i64,
    /// Hydra's: files the build declared in `nix-support/hydra-build-products`.
    buildproducts: BTreeMap<String, serde_json::Value>,
    /// Hydra's: `nix-support/hydra-metrics`, by name.
    buildmetrics: BTreeMap<String, serde_json::Value>,
    /// Hydra's release name (`meta.releaseName`); Kiln sets none.
    releasename: Option<String>,
    /// Hydra's: the build is an aggregate of others.
    isaggregate: i64,
}

async fn build_view(s: &AppState, id: i64) -> Result<BuildView, WebError> {
    let mut c = s.db.conn().await?;
    let b = builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let j = jobsets::get_by_id(c.ex(), b.jobset_id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let p =
        projects::get_by_id(c.ex(), j.project_id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let outputs = builds::outputs(c.ex(), id).await?;
    let evals = evaluations::of_build(c.ex(), id).await?;
    let steps = match b.top_step_id {
        Some(top) => crate::db::steps::closure_of(c.ex(), top).await?,
        None => Vec::new(),
    };
    let count = |state: &str| steps.iter().filter(|s| s.state == state).count() as i64;
    let (mut buildproducts, mut buildmetrics) = (BTreeMap::new(), BTreeMap::new());
    if let Some(top) = b.top_step_id {
        for p in crate::db::products::products_of(c.ex(), top).await? {
            let v = serde_json::json!({
                "type": p.kind, "subtype": p.subtype, "name": p.name, "path": p.path, "defaultpath": p.default_path,
                "filesize": p.file_size, "sha1hash": null, "sha256hash": null,
            });
            buildproducts.insert(p.nr.to_string(), v);
        }
        for m in crate::db::products::metrics_of(c.ex(), top).await? {
            buildmetrics.insert(m.name.clone(), serde_json::json!({"name": m.name, "value": m.value, "unit": m.unit}));
        }
    }
    Ok(BuildView {
        nrbuiltsteps: count("succeeded"),
        nrsubstitutedsteps: count("substituted"),
        id: b.id,
        project: p.name,
        jobset: j.name,
        job: b.job,
        nixname: b.nix_name,
        system: b.system,
        drvpath: b.drv_path,
        finished: b.finished as i64,
        buildstatus: b.build_status,
        timestamp: b.created_at,
        starttime: b.start_time,
        stoptime: b.stop_time,
        priority: b.priority,
        iscachedbuild: b.is_cached as i64,
        keep: b.keep,
        description: b.description,
        license: b.license,
        homepage: b.homepage,
        maintainers: b.maintainers,
        buildoutputs: outputs.into_iter().map(|o| (o.name, OutputView { path: o.path })).collect(),
        jobsetevals: evals,
        error: b.error,
        buildproducts,
        buildmetrics,
        releasename: None,
        isaggregate: b.is_aggregate as i64,
    })
}

pub(super) async fn build_json(s: &AppState, id: i64) -> Result<BuildView, WebError> {
    build_view(s, id).await
}

pub async fn get_build(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Json<BuildView>, WebError> {
    Ok(Json(build_view(&s, id).await?))
}

async fn latest(s: &AppState, project: &str, jobset: &str, job: &str) -> Result<builds::Build, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), project, jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?;
    builds::latest_successful(c.ex(), j.id, job)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("a successful build of {project}:{jobset}:{job}")))
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/latest", tag = "deploy", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("job" = String, Path, description = "job name (attribute path)")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 303, description = "redirects to the newest successful build"), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn job_latest(
    State(s): State<AppState>,
    Path((project, jobset, job)): Path<(String, String, String)>,
) -> Result<Response, WebError> {
    let b = latest(&s, &project, &jobset, &job).await?;
    Ok(Redirect::to(&format!("/build/{}", b.id)).into_response())
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/latest/output/{output}", tag = "deploy",
    params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("job" = String, Path, description = "job name (attribute path)"), ("output" = String, Path, description = "output name, e.g. out")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the store path, one line", content_type = "text/plain", body = String), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn job_latest_output(
    State(s): State<AppState>,
    Path((project, jobset, job, output)): Path<(String, String, String, String)>,
) -> Result<Response, WebError> {
    let b = latest(&s, &project, &jobset, &job).await?;
    let mut c = s.db.conn().await?;
    let o = builds::outputs(c.ex(), b.id)
        .await?
        .into_iter()
        .find(|o| o.name == output)
        .ok_or_else(|| WebError::NotFound(format!("output {output} of build {}", b.id)))?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{}\n", o.path)).into_response())
}
