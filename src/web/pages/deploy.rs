//! The deployment pages: every environment (what runs where now, what is
//! pending), one environment with its deployments, and one deployment with
//! its waves, each host's closures, activation log and checks. Each answers
//! JSON at the same URL.

use super::*;
use crate::db::deployment_hosts::{self as dh, HostRow};
use crate::db::deployments::{self, Deployment};
use crate::db::environments;
use crate::deploy::host::CheckResult;

/// A host of an environment and the closure Kiln last left it on.
#[derive(serde::Serialize, utoipa::ToSchema, Clone)]
pub struct HostNow {
    pub host: String,
    pub target: String,
    pub job: String,
    pub wave: i64,
    /// `None`: never deployed, or a failed switch left it unknown.
    pub running: Option<String>,
    pub deployment: Option<i64>,
}

#[derive(serde::Serialize, utoipa::ToSchema, Clone)]
pub struct EnvironmentView {
    pub project: String,
    pub name: String,
    pub jobset: String,
    /// `auto` or `manual`.
    pub mode: String,
    pub waves: Vec<Vec<String>>,
    pub hosts: Vec<HostNow>,
    /// Newest first.
    pub deployments: Vec<Deployment>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct EnvironmentsView {
    pub environments: Vec<EnvironmentView>,
}

/// One host's part in a deployment.
#[derive(serde::Serialize, utoipa::ToSchema, Clone)]
pub struct DeploymentHost {
    pub host: String,
    pub wave: i64,
    pub job: String,
    pub build_id: Option<i64>,
    pub store_path: String,
    pub previous_path: Option<String>,
    /// `pending`, `waiting`, `switching`, `checking`, `rolling-back`, `succeeded`, `skipped`, `failed`, `rolled-back`, `rollback-failed`, `not-started`.
    pub status: String,
    pub log: String,
    pub checks: Vec<CheckResult>,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl From<HostRow> for DeploymentHost {
    fn from(r: HostRow) -> Self {
        DeploymentHost {
            checks: serde_json::from_str(&r.checks).unwrap_or_default(),
            host: r.host,
            wave: r.wave,
            job: r.job,
            build_id: r.build_id,
            store_path: r.store_path,
            previous_path: r.previous_path,
            status: r.status,
            log: r.log,
            error: r.error,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DeploymentView {
    #[serde(flatten)]
    pub deployment: Deployment,
    pub project: String,
    pub environment: String,
    pub hosts: Vec<DeploymentHost>,
}

async fn environment_view(
    c: &mut crate::db::Conn,
    project: &str,
    env: &environments::Environment,
    limit: i64,
) -> Result<EnvironmentView, WebError> {
    let spec = env.spec()?;
    let current = dh::current(c.ex(), env.id).await?;
    let hosts = spec
        .hosts
        .iter()
        .map(|(name, h)| {
            let now = current.iter().find(|(n, _, _)| n == name);
            HostNow {
                host: name.clone(),
                target: h.target.clone().unwrap_or_else(|| "pull: kiln agent".into()),
                job: h.job.clone(),
                wave: spec.wave_of(name).unwrap_or(0) as i64,
                running: now.and_then(|(_, p, _)| p.clone()),
                deployment: now.map(|(_, _, d)| *d),
            }
        })
        .collect();
    let deployments = deployments::of_environment(c.ex(), env.id, limit).await?;
    Ok(EnvironmentView {
        project: project.to_string(),
        name: env.name.clone(),
        jobset: spec.jobset.clone(),
        mode: match spec.mode {
            crate::deploy::spec::Mode::Auto => "auto".into(),
            crate::deploy::spec::Mode::Manual => "manual".into(),
        },
        waves: spec.waves.clone(),
        hosts,
        deployments,
    })
}

#[derive(Template)]
#[template(path = "environments.html")]
struct EnvironmentsPage {
    title: String,
    nav: Nav,
    envs: Vec<EnvironmentView>,
}

/// Every environment, what each host runs and what is pending.
#[utoipa::path(get, path = "/environments", tag = "pages",
    responses((status = 200, description = "every declared environment", content((EnvironmentsView = "application/json"), (String = "text/html")))))]
pub async fn environments(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let mut envs = Vec::new();
    for (project, env) in environments::list(c.ex()).await? {
        envs.push(environment_view(&mut c, &project, &env, 5).await?);
    }
    if wants_json(&headers) {
        return Ok(axum::Json(EnvironmentsView { environments: envs }).into_response());
    }
    html(EnvironmentsPage { title: "Environments · Kiln".into(), nav: nav(&s, &headers), envs })
}

#[derive(Template)]
#[template(path = "environment.html")]
struct EnvironmentPage {
    title: String,
    nav: Nav,
    e: EnvironmentView,
}

/// One environment: its hosts and its deployments, newest first.
#[utoipa::path(get, path = "/environment/{project}/{name}", tag = "pages",
    params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("name" = String, Path, description = "environment name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the environment", content((EnvironmentView = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn environment(
    State(s): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let env = environments::get(c.ex(), &project, &name)
        .await?
        .filter(|e| e.declared)
        .ok_or_else(|| WebError::NotFound(format!("environment {project}:{name}")))?;
    let e = environment_view(&mut c, &project, &env, 50).await?;
    if wants_json(&headers) {
        return Ok(axum::Json(e).into_response());
    }
    html(EnvironmentPage { title: format!("{project}:{name} · Kiln"), nav: nav(&s, &headers), e })
}

#[derive(Template)]
#[template(path = "deployment.html")]
struct DeploymentPage {
    title: String,
    nav: Nav,
    d: DeploymentView,
    waves: Vec<(i64, Vec<DeploymentHost>)>,
}

/// One deployment: its waves and each host's part, live.
#[utoipa::path(get, path = "/deployment/{id}", tag = "pages", params(("id" = i64, Path, description = "deployment id", minimum = 1)),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the deployment", content((DeploymentView = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn deployment(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let d = deployments::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("deployment {id}")))?;
    let env = environments::get_by_id(c.ex(), d.environment_id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("deployment {id}")))?;
    let project = projects::get_by_id(c.ex(), env.project_id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("deployment {id}")))?;
    let hosts: Vec<DeploymentHost> = dh::of_deployment(c.ex(), id).await?.into_iter().map(Into::into).collect();
    let view = DeploymentView { deployment: d, project: project.name, environment: env.name, hosts };
    if wants_json(&headers) {
        return Ok(axum::Json(view).into_response());
    }
    let mut waves: Vec<(i64, Vec<DeploymentHost>)> = Vec::new();
    for h in &view.hosts {
        match waves.last_mut() {
            Some((w, list)) if *w == h.wave + 1 => list.push(h.clone()),
            _ => waves.push((h.wave + 1, vec![h.clone()])),
        }
    }
    html(DeploymentPage {
        title: format!("Deployment {id} of {}:{} · Kiln", view.project, view.environment),
        nav: nav(&s, &headers),
        d: view,
        waves,
    })
}

/// A status's CSS class.
pub fn deploy_class(status: &str) -> &'static str {
    match status {
        "succeeded" | "skipped" => "ok",
        "failed" | "rollback-failed" => "bad",
        "rolled-back" => "bad",
        "running" | "switching" | "checking" | "queued" | "waiting" | "pending" | "rolling-back" => "queued",
        _ => "other",
    }
}
